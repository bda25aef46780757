from fractions import Fraction

import pytest
import torch

from segrun.engine import checkpoint as ck
from segrun.errors import SegrunError


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
