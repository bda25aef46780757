"""Weights from the local Hugging Face cache (where timm and smp keep them), checked by their SHA-256.

segrun never downloads: a weights *name* resolves to ``$HF_HUB_CACHE/models--<org>--<repo>/snapshots/
<revision>/<file>`` (``~/.cache/huggingface/hub`` by default; ``$HF_HOME``/``$HF_HUB_CACHE`` move it).
That snapshot file links to ``blobs/<sha256>``, the hash the hub published, so the content is checked
against the name it is stored under; a missing file is one line saying what to place where and how to
fetch it on a machine with internet.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from segrun.models.pretrained import PretrainedError, PretrainedNotFoundError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_blob(path: Path) -> None:
    """A cached snapshot file whose blob is named by a SHA-256 must have that hash (LFS files are)."""
    blob = Path(path).resolve()
    if not _SHA256.match(blob.name):
        return  # small non-LFS files are named by their git hash; nothing to compare with here
    actual = sha256_of(blob)
    if actual != blob.name:
        raise PretrainedError(f"model.pretrained: '{path}' (blob {blob.name[:12]}...) has SHA-256 {actual[:12]}...: "
                              "a partial or different file; fetch it again")


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_hub_file(spec: str, what: str, repo_id: str, filenames: tuple[str, ...] = ("model.safetensors",),
                    revision: str | None = None) -> str:
    """The checked local path of the first of ``filenames`` cached for ``repo_id``; never a download.

    ``spec`` is the user's ``model.pretrained`` value and ``what`` names the weights in the message.
    """
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            verify_blob(Path(found))
            return found
    folder = cache_dir() / f"models--{repo_id.replace('/', '--')}"
    rev = revision or "main"
    fetch = f"huggingface-cli download {repo_id} {filenames[0]}" + (f" --revision {revision}" if revision else "")
    raise PretrainedNotFoundError(
        f"model.pretrained={spec}: {what} is not in the Hugging Face cache: place {filenames[0]} of {repo_id} "
        f"(revision {rev}) in {folder}/ (segrun never downloads; on a machine with internet, {fetch} fills that "
        f"machine's cache: copy its {folder.name} folder here, or give model.pretrained=/path/to/{filenames[0]})")
