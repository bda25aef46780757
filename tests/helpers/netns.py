"""A private network namespace for engines started by tests: only ``lo``, so nothing they bind or probe
can leave this machine, and their ports never collide with another test's.

``unshare --net`` starts a holder process (``sleep``) whose namespace the others join with ``nsenter``;
``stop()`` kills every process still in it (ours by construction), then the holder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Sequence


def unavailable() -> str | None:
    """Why no namespace can be made here (one line), or None."""
    missing = [t for t in ("unshare", "nsenter", "ip") if shutil.which(t) is None]
    if missing:
        return f"network namespace: {', '.join(missing)} not found (apt-get install util-linux iproute2)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no network namespace here (unshare --net: {probe.stderr.strip()[:120] or 'not permitted'})"
    return None


class NetNamespace:
    """``with NetNamespace(extra_loopback="127.0.0.2/8") as ns: ns.run([...])``."""

    def __init__(self, extra_loopback: str | None = None, env: dict | None = None) -> None:
        self.extra = extra_loopback
        self.env = {**os.environ, **(env or {})}
        self.holder: subprocess.Popen | None = None

    def start(self) -> "NetNamespace":
        why = unavailable()
        if why:
            raise RuntimeError(why)
        setup = "ip link set lo up" + (f" && ip addr add {self.extra} dev lo" if self.extra else "")
        self.holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", f"{setup} && exec sleep 100000"],
                                       start_new_session=True)
        deadline = time.monotonic() + 10
        while "UP" not in self.run(["ip", "-o", "link", "show", "lo"], timeout=5).stdout:
            if self.holder.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("network namespace: lo did not come up within 10 s")
            time.sleep(0.1)
        return self

    @property
    def prefix(self) -> list[str]:
        assert self.holder is not None, "namespace not started"
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]

    def run(self, argv: Sequence[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.Popen([*self.prefix, *argv], env=env, **kwargs)

    def pids(self) -> list[int]:
        """Every process in the namespace but the holder."""
        if self.holder is None:
            return []
        try:
            mine = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        except OSError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == mine:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        """SIGKILL whatever is left inside, then the holder; idempotent."""
        if self.holder is None:
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.holder.kill()
        self.holder.wait()
        self.holder = None

    def __enter__(self) -> "NetNamespace":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
