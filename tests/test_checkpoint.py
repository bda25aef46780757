import pytest
import torch

from segrun.engine import checkpoint as ck


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
    with pytest.raises(ck.CheckpointError, match="junk.pt could not be read"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ck.CheckpointError, match="not a segrun checkpoint"):
        ck.load_checkpoint(tmp_path / "foreign.pt")


def test_module_prefix_is_stripped():
    assert ck.strip_module_prefix({"module.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}
