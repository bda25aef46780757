import errno
import os
import stat
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from segrun.engine import checkpoint as ck
from segrun.errors import SegrunError, few


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((3,), v)}, "epoch": int(v)}


def test_roundtrip_and_metadata(tmp_path):
    path = tmp_path / "ckpts" / "last.pt"
    ck.save_checkpoint(_state(1.0), path)
    loaded = ck.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3))
    assert loaded["format"] == ck.FORMAT_VERSION and "segrun_version" in loaded
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left behind


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(_state(1.0), path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_roundtrip_through_a_file(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save_checkpoint({"model": {}, "rng": ck.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_bad_paths_raise_clear_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match=r"junk.pt is not a segrun checkpoint \(not a file written by torch"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ck.CheckpointError, match="not a segrun checkpoint"):
        ck.load_checkpoint(tmp_path / "foreign.pt")


def test_damaged_foreign_and_newer_files_are_named_in_plain_words(tmp_path):
    good = tmp_path / "good.pt"
    ck.save_checkpoint({"model": {"w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])  # a copy interrupted half way
    with pytest.raises(ck.CheckpointError, match=f"cut.pt is truncated \\({len(data) // 2:,} bytes"):
        ck.load_checkpoint(cut)
    torch.save({"model": {}, "format": 1, "extra": Fraction(1, 3)}, tmp_path / "objects.pt")  # a pickled class
    with pytest.raises(ck.CheckpointError, match="objects.pt is not a segrun checkpoint .*fractions.Fraction"):
        ck.load_checkpoint(tmp_path / "objects.pt")
    torch.save({"model": {}, "format": ck.FORMAT_VERSION + 1, "segrun_version": "9.0"}, tmp_path / "newer.pt")
    with pytest.raises(ck.CheckpointError, match=r"newer.pt was written by a newer segrun \(9.0, format 2\)"):
        ck.load_checkpoint(tmp_path / "newer.pt")
    assert issubclass(ck.CheckpointError, SegrunError) and issubclass(ck.CheckpointError, ValueError)


def test_module_prefix_is_stripped():
    assert ck.strip_module_prefix({"module.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}


def test_payloads_without_model_or_format_are_refused(tmp_path):
    for name, payload in (("no_model", {"format": 1}), ("no_format", {"model": {}}), ("list", ["model", "format"])):
        torch.save(payload, tmp_path / f"{name}.pt")
        with pytest.raises(ck.CheckpointError, match=rf"{name}.pt is not a segrun checkpoint \(no 'model'/'format'"):
            ck.load_checkpoint(tmp_path / f"{name}.pt")


def test_map_location_is_honoured(tmp_path):
    ck.save_checkpoint(_state(1.0), tmp_path / "c.pt")
    assert ck.load_checkpoint(tmp_path / "c.pt", map_location="meta")["model"]["w"].device.type == "meta"


def test_temp_file_is_a_hidden_sibling_and_missing_folders_are_created(tmp_path, monkeypatch):
    renames = []
    real_replace = ck.os.replace
    monkeypatch.setattr(ck.os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst)))
    path = tmp_path / "a" / "b" / "last.pt"  # two missing levels
    ck.save_checkpoint(_state(1.0), path)
    (src, dst), = renames
    src = ck.Path(src)
    # same folder: the rename is atomic (one filesystem) and `*.pt` globs never see a half-written file
    assert src.parent == path.parent and src.name.startswith(".last.pt.") and src.name.endswith(".tmp")
    assert ck.Path(dst) == path and ck.load_checkpoint(path)["epoch"] == 1


def test_numpy_cached_gaussian_survives_the_rng_roundtrip(tmp_path):
    import numpy as np

    np.random.seed(4)
    np.random.randn()  # the legacy generator now holds a cached second gaussian (has_gauss = 1)
    ck.save_checkpoint({"model": {}, "rng": ck.rng_state()}, tmp_path / "r.pt")
    expected = np.random.randn()
    np.random.seed(0)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert np.random.randn() == expected


def test_refusal_messages_in_full(tmp_path, monkeypatch):
    good = tmp_path / "good.pt"
    ck.save_checkpoint(_state(1.0), good)
    size = good.stat().st_size
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: size // 2])
    with pytest.raises(ck.CheckpointError, match=r"truncated .*: copy it again or use another checkpoint$"):
        ck.load_checkpoint(cut)
    torch.save({"model": {}, "format": 99}, tmp_path / "newer.pt")
    with pytest.raises(ck.CheckpointError, match=r"newer segrun \(\?, format 99\); .* upgrade segrun$"):
        ck.load_checkpoint(tmp_path / "newer.pt")

    def refuse(*a, **k):
        import pickle
        raise pickle.UnpicklingError("some objects")

    monkeypatch.setattr(ck.torch, "load", refuse)
    with pytest.raises(ck.CheckpointError, match=r"good.pt is not a segrun checkpoint \(it holds Python objects, "
                                                 r"which segrun never writes and does not load\)$"):
        ck.load_checkpoint(good)

    def damaged(*a, **k):
        raise RuntimeError("bad\n   crc " + "x" * 300)

    monkeypatch.setattr(ck.torch, "load", damaged)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(good)
    first = ("bad crc " + "x" * 300)[:200]
    assert str(e.value) == (f"checkpoint {good} could not be read; the file is damaged ({size:,} bytes; "
                            f"RuntimeError: {first})")


# ---- fast pins of the long-run helpers (test_faults.py drives them through real runs, slowly) ----

def test_prune_keeps_the_newest_epoch_files_by_number_and_nothing_else(tmp_path):
    names = ["epoch_0001.pt", "epoch_0002.pt", "epoch_9.pt", "epoch_10.pt", "epoch_0011.pt",
             "best.pt", "last.pt", "epoch_0003.pt.tmp", ".epoch_0004.pt.abc.tmp", "xepoch_0005.pt", "epoch_x.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    removed = ck.prune_epoch_checkpoints(tmp_path, 2)
    # numeric order: 1, 2, 9, 10, 11 (by name "epoch_9.pt" would sort after "epoch_10.pt")
    assert removed == [tmp_path / "epoch_0001.pt", tmp_path / "epoch_0002.pt", tmp_path / "epoch_9.pt"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(set(names) - {"epoch_0001.pt", "epoch_0002.pt", "epoch_9.pt"})
    assert ck.prune_epoch_checkpoints(str(tmp_path), 1) == [tmp_path / "epoch_10.pt"]
    assert not (tmp_path / "epoch_10.pt").exists() and (tmp_path / "epoch_0011.pt").exists()
    assert ck.prune_epoch_checkpoints(tmp_path, 1) == []  # nothing more to remove


def test_prune_tolerates_a_file_removed_by_someone_else_meanwhile(tmp_path, monkeypatch):
    for n in (3, 4):
        (tmp_path / f"epoch_{n:04d}.pt").write_bytes(b"")
    listing = Path.iterdir
    # a file listed but gone by the time it is unlinked (another process pruned it first)
    monkeypatch.setattr(Path, "iterdir", lambda self: [*listing(self), self / "epoch_0001.pt"])
    assert ck.prune_epoch_checkpoints(tmp_path, 1) == [tmp_path / "epoch_0001.pt", tmp_path / "epoch_0003.pt"]
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0004.pt"]


def test_prune_with_zero_or_a_missing_folder_removes_nothing(tmp_path):
    for n in (1, 2, 3):
        (tmp_path / f"epoch_{n:04d}.pt").write_bytes(b"")
    assert ck.prune_epoch_checkpoints(tmp_path, 0) == []
    assert ck.prune_epoch_checkpoints(tmp_path, -1) == []
    assert len(list(tmp_path.iterdir())) == 3
    assert ck.prune_epoch_checkpoints(tmp_path / "absent", 2) == []
    assert ck.prune_epoch_checkpoints(tmp_path / "epoch_0001.pt", 2) == []  # a file, not a folder
    assert ck.prune_epoch_checkpoints(tmp_path, 5) == []  # fewer files than kept
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_in_any_float_dtype(dtype, bad):
    t = torch.zeros(5, dtype=dtype)
    assert ck.all_finite([t]) is True
    t[3] = bad
    assert ck.all_finite([t]) is False
    assert ck.all_finite([torch.ones(2), t]) is False
    assert ck.all_finite([t, torch.ones(2, dtype=torch.float64)]) is False
    other = torch.float32 if dtype != torch.float32 else torch.float16
    # the bad tensor in its own dtype group, before or after a finite group
    assert ck.all_finite([torch.ones(3, dtype=other), t]) is False
    assert ck.all_finite([t, torch.ones(3, dtype=other)]) is False


def test_all_finite_ignores_what_cannot_be_non_finite():
    assert ck.all_finite([]) is True
    assert ck.all_finite(iter([])) is True
    assert ck.all_finite([torch.tensor([1, -7, 2**40]), torch.tensor([True, False])]) is True
    assert ck.all_finite([torch.empty(0), torch.empty(0, 3, dtype=torch.float16)]) is True
    assert ck.all_finite([float("nan"), "inf", None, torch.ones(2)]) is True  # only tensors are checked
    assert ck.all_finite([torch.tensor([1, 2]), torch.tensor([float("nan")])]) is False
    assert ck.all_finite([torch.tensor([1 + 2j]), torch.tensor([complex(0, float("inf"))])]) is False
    # large but finite: a max-abs reduction does not overflow where a sum of squares would (65504 = fp16 max)
    assert ck.all_finite([torch.full((64,), 60000.0, dtype=torch.float16)]) is True
    assert ck.all_finite([torch.full((64,), 3e38)]) is True
    grad = torch.ones(3, requires_grad=True) * 2
    assert ck.all_finite([grad]) is True


def test_state_tensors_walks_nested_dicts_lists_and_tuples_in_order():
    a, b, c, d, e = (torch.full((1,), float(i)) for i in range(5))
    state = {"x": a, "y": [b, (c, {"z": d, "n": 3, "s": "t"})], "none": None, "w": {"deep": [[e]]}}
    got = list(ck.state_tensors(state))
    assert len(got) == 5 and all(g is t for g, t in zip(got, [a, b, c, d, e]))
    assert [t.item() for t in ck.state_tensors([state, a])] == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0]
    assert list(ck.state_tensors(7)) == [] and list(ck.state_tensors({})) == []
    assert list(ck.state_tensors({"s": "abc", "f": 1.5})) == []
    assert list(ck.state_tensors(b))[0] is b


def _two_layers() -> torch.nn.Module:
    # state dict keys: 0.weight [3, 2], 0.bias [3], 1.weight [1, 3], 1.bias [1]
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))


def test_load_model_state_loads_a_fitting_state():
    model = _two_layers()
    state = {"0.weight": torch.full((3, 2), 0.5), "0.bias": torch.arange(3.0),
             "1.weight": torch.ones(1, 3), "1.bias": torch.tensor([-2.0])}
    assert ck.load_model_state(model, state, "run/last.pt") is None
    assert torch.equal(model[0].bias.detach(), torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(model(torch.ones(1, 2)), torch.tensor([[4.0]]))  # hidden 0.5+0.5+[0, 1, 2] = [1, 2, 3]; 1+2+3-2


def test_load_model_state_names_every_kind_of_mismatch_in_one_line():
    model = _two_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "1.weight": torch.zeros(2, 3),
             "extra.w": torch.zeros(1)}
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_model_state(model, state, "runs/a/last.pt")
    assert str(info.value) == (
        "checkpoint runs/a/last.pt does not fit the configured model: 2 shapes differ (checkpoint vs model: "
        "0.bias [4] vs [3], 1.weight [2, 3] vs [1, 3]); 1 keys missing from the checkpoint (1.bias); "
        "1 unexpected keys (extra.w); resume with the model options the run was started with")
    assert isinstance(info.value, SegrunError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_load_model_state_each_mismatch_alone_and_long_lists_cut():
    model = _two_layers()
    full = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    tail = "; resume with the model options the run was started with"
    head = "checkpoint c.pt does not fit the configured model: "
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_model_state(model, {}, "c.pt")
    assert str(info.value) == head + ("4 keys missing from the checkpoint "
                                      "(0.weight, 0.bias, 1.weight, ... (4 in all))") + tail
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_model_state(model, {**full, "a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}, "c.pt")
    assert str(info.value) == head + "3 unexpected keys (a, b, c)" + tail
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_model_state(model, {**full, "1.bias": torch.zeros(1, 1)}, "c.pt")
    assert str(info.value) == head + "1 shapes differ (checkpoint vs model: 1.bias [1, 1] vs [1])" + tail


def test_few_lists_at_most_n_items_and_counts_the_rest():
    assert few([]) == ""
    assert few(["a"]) == "a"
    assert few(["a", "b", "c"]) == "a, b, c"
    assert few(["a", "b", "c", "d"]) == "a, b, c, ... (4 in all)"
    assert few(["a", "b", "c"], n=2) == "a, b, ... (3 in all)"
    assert few(["a", "b"], n=2) == "a, b"


def test_umask_mode_applies_the_process_umask_and_leaves_it_set():
    old = os.umask(0o027)
    try:
        assert ck.umask_mode() == 0o640
        assert ck.umask_mode(0o777) == 0o750
        assert ck.umask_mode(0o600) == 0o600
        assert os.umask(0o002) == 0o027  # the query inside umask_mode restored it
        assert ck.umask_mode() == 0o664
        assert os.umask(0o077) == 0o002
        assert ck.umask_mode() == 0o600
    finally:
        os.umask(old)


def test_saved_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        ck.save_checkpoint(_state(1.0), tmp_path / "a.pt")
        os.umask(0o002)
        ck.save_checkpoint(_state(1.0), tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o664


NO_SPACE = "cannot write checkpoint {}: no space left on device; any previous file there is intact"


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "disk quota"),  # errno 28 with its own wording ("[Errno 28] disk quota")
    RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed, No space left on device"),
    RuntimeError("unexpected pos 1024 vs 512 (Errno 28)"),
    OSError("write failed:\n  No space left\ton device"),
])
def test_write_failure_says_no_space_whatever_carries_it(exc):
    assert ck.write_failure(Path("runs/x/last.pt"), exc) == NO_SPACE.format("runs/x/last.pt")
    assert ck.write_failure("a b/c.pt", exc) == NO_SPACE.format("a b/c.pt")


def test_write_failure_trusts_the_errno_when_the_text_does_not_say_it():
    exc = OSError("quota exceeded")  # one argument: str() carries no "[Errno 28]"
    exc.errno = errno.ENOSPC
    assert ck.write_failure("q.pt", exc) == NO_SPACE.format("q.pt")
    exc.errno = errno.EIO
    assert ck.write_failure("q.pt", exc) == "cannot write checkpoint q.pt: quota exceeded; any previous file there is intact"


def test_write_failure_names_the_path_and_the_cause():
    end = "; any previous file there is intact"
    assert ck.write_failure("r/last.pt", OSError(errno.EACCES, "Permission denied", "r/.last.pt.tmp")) == (
        "cannot write checkpoint r/last.pt: Permission denied" + end)
    assert ck.write_failure("r/last.pt", PermissionError(errno.EACCES, "Permission denied")) == (
        "cannot write checkpoint r/last.pt: Permission denied" + end)
    assert ck.write_failure("r/last.pt", OSError("read-only\n   file   system")) == (
        "cannot write checkpoint r/last.pt: read-only file system" + end)
    assert ck.write_failure("r/last.pt", RuntimeError("  writer\nbroke  ")) == (
        "cannot write checkpoint r/last.pt: writer broke" + end)
    assert ck.write_failure("r/last.pt", RuntimeError()) == "cannot write checkpoint r/last.pt: RuntimeError" + end
    assert ck.write_failure("r/last.pt", OSError()) == "cannot write checkpoint r/last.pt: OSError" + end
    assert ck.write_failure("r/last.pt", OSError(errno.EIO, "")) == (
        f"cannot write checkpoint r/last.pt: [Errno {errno.EIO}]" + end)  # empty strerror: the text, trimmed
    long = RuntimeError("x" * 150 + " " + "y" * 150)
    assert ck.write_failure("p", long) == "cannot write checkpoint p: " + "x" * 150 + " " + "y" * 49 + end


def test_a_failed_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(_state(1.0), path)
    for exc, cause in [(OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
                       (RuntimeError("writer failed"), "writer failed")]:
        def failing_save(obj, f, *a, _exc=exc, **k):
            f.write(b"partial")
            raise _exc
        monkeypatch.setattr(ck.torch, "save", failing_save)
        with pytest.raises(ck.CheckpointWriteError) as info:
            ck.save_checkpoint(_state(2.0), path)
        monkeypatch.undo()
        assert str(info.value) == f"cannot write checkpoint {path}: {cause}; any previous file there is intact"
        assert info.value.__cause__ is None and info.value.__suppress_context__
        assert isinstance(info.value, SegrunError) and isinstance(info.value, OSError)
        assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
        assert ck.load_checkpoint(path)["epoch"] == 1
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(ck.CheckpointWriteError("as is")))
    with pytest.raises(ck.CheckpointWriteError, match="^as is$"):
        ck.save_checkpoint(_state(2.0), path)
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(ValueError("not a write error")))
    with pytest.raises(ValueError, match="^not a write error$"):
        ck.save_checkpoint(_state(2.0), path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
