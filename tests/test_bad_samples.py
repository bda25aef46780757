"""``dataset.on_bad_sample`` / ``max_bad_samples`` bookkeeping (``segrun.data.bad_samples``), in-process."""

from __future__ import annotations

import pytest

from segrun.data.bad_samples import BadSamples, bad_sample_limit, check_policy, replacement_index
from segrun.data.base import DatasetError
from segrun.errors import ConfigError


def test_policies_are_error_or_skip():
    assert check_policy("error") == "error" and check_policy("skip") == "skip"
    for bad in ("ignore", "Skip", None, True, ""):
        with pytest.raises(ConfigError) as exc:
            check_policy(bad)
        assert str(exc.value) == f"dataset.on_bad_sample={bad!r}: expected one of error, skip"


@pytest.mark.parametrize("value, size, limit", [(0.01, 1000, 10), (0.01, 99, 0), (0.5, 7, 3), (0, 100, 0), (0.0, 5, 0),
                                                (0.999, 10, 9), (1, 100, 1), (1.0, 3, 1), (20, 5, 20), (2.7, 10, 2)])
def test_the_limit_is_a_fraction_below_1_else_a_count(value, size, limit):
    assert bad_sample_limit(value, size) == limit


@pytest.mark.parametrize("value", [-0.1, -1, True, False, "5", None, [1]])
def test_a_bad_limit_is_one_line(value):
    with pytest.raises(ConfigError) as exc:
        bad_sample_limit(value, 10)
    assert str(exc.value) == (f"dataset.max_bad_samples={value!r}: expected a fraction of the split (e.g. 0.01) "
                              "or a number of files (e.g. 20)")


def test_a_replacement_is_another_index_fixed_by_its_arguments():
    assert replacement_index(0, 1, 0, 3, 1) == 0 and replacement_index(0, 0, 5, None, None) == 0  # nothing else
    assert {replacement_index(0, 2, a, 1, e) for a in range(20) for e in range(3)} == {1}  # the only other one
    assert {replacement_index(1, 2, a, 1, e) for a in range(20) for e in range(3)} == {0}
    drawn = [replacement_index(4, 9, a, 7, 2) for a in range(200)]
    assert set(drawn) == {0, 1, 2, 3, 5, 6, 7, 8}  # every other index, never 4 itself
    assert drawn == [replacement_index(4, 9, a, 7, 2) for a in range(200)]  # the same for the same arguments
    for changed in ([4, 9, 0, 8, 2], [4, 9, 0, 7, 3], [3, 9, 0, 7, 2]):  # seed, epoch and index each matter
        assert [replacement_index(changed[0], 9, a, *changed[3:]) for a in range(20)] != \
            [replacement_index(4, 9, a, 7, 2) for a in range(20)], changed
    # no seed or epoch (validation, a loader without epochs) is seed or epoch 0
    assert [replacement_index(4, 9, a, None, None) for a in range(20)] == [replacement_index(4, 9, a, 0, 0)
                                                                            for a in range(20)]
    assert [replacement_index(4, 9, a, None, 5) for a in range(20)] != [replacement_index(4, 9, a, None, 0)
                                                                         for a in range(20)]


def test_bad_samples_are_counted_once_in_the_order_first_seen():
    bad = BadSamples("train", limit=2, seen=["a.jpg: truncated"])
    assert bad.split == "train" and bad.limit == 2 and len(bad) == 1
    assert bad.add(["b.png: bad", "a.jpg: truncated", "b.png: bad", "c.png: bad"]) == ["b.png: bad", "c.png: bad"]
    assert bad.add(["c.png: bad"]) == [] and bad.add([]) == []
    assert bad.as_list() == ["a.jpg: truncated", "b.png: bad", "c.png: bad"] and len(bad) == 3
    assert BadSamples("val", 0).as_list() == []


def test_more_bad_samples_than_the_limit_stop_the_run():
    bad = BadSamples("val", limit=2)
    bad.add(["1", "2"])
    bad.check()  # at the limit: fine
    bad.add(["3"])
    with pytest.raises(DatasetError) as exc:
        bad.check()
    assert str(exc.value) == "3 bad samples in the val split, more than dataset.max_bad_samples allows (2): 1 | 2 | 3"
    bad = BadSamples("train", limit=4, seen=[f"f{i}" for i in range(7)])
    with pytest.raises(DatasetError) as exc:
        bad.check()
    assert str(exc.value) == ("7 bad samples in the train split, more than dataset.max_bad_samples allows (4): "
                              "f0 | f1 | f2 | f3 | f4 | ... (7 in all)")
    six = BadSamples("train", limit=4, seen=[f"f{i}" for i in range(6)])
    with pytest.raises(DatasetError, match=r"allows \(4\): f0 \| f1 \| f2 \| f3 \| f4 \| \.\.\. \(6 in all\)$"):
        six.check()
    five = BadSamples("train", limit=4, seen=[f"f{i}" for i in range(5)])
    with pytest.raises(DatasetError, match=r"allows \(4\): f0 \| f1 \| f2 \| f3 \| f4$"):
        five.check()
    BadSamples("train", limit=0).check()
