import json
import time

import pytest

from sparsewise.bench import PairedResult, compare, timeit, write_results


def _work(n=30000):
    s = 0
    for i in range(n):
        s += i * i
    return s


def _within(measure, lo, hi, tries=3):
    # The machine is shared: a burst from a neighbour can skew one whole measurement. A broken
    # harness misses the range every time; a sound one lands in it within a few tries.
    results = []
    for _ in range(tries):
        r = measure()
        results.append(r)
        if lo < r.ratio < hi:
            return r
    raise AssertionError(f"ratio outside ({lo}, {hi}) in {tries} tries: " + "; ".join(map(str, results)))


def test_same_function_gives_ratio_near_one():
    r = _within(lambda: compare(_work, _work, pairs=9, min_time=0.02, name="A vs A"), 0.8, 1.25)
    assert r.ratio_min <= r.ratio <= r.ratio_max
    assert r.pairs == 9 and r.inner >= 1 and r.threads >= 1


def test_twice_the_work_is_detected_as_about_2x():
    _within(lambda: compare(_work, lambda: (_work(), _work()), pairs=9, min_time=0.02), 1.6, 2.5)
    # swapped roles: the candidate is now the slow one
    _within(lambda: compare(lambda: (_work(), _work()), _work, pairs=9, min_time=0.02), 0.4, 0.62)


def test_twice_the_wait_is_detected_as_2x():
    # sleeping is not slowed by other processes' CPU use: a tight check of the arithmetic
    r = compare(lambda: time.sleep(0.002), lambda: time.sleep(0.004), pairs=5, min_time=0.01)
    assert 1.6 < r.ratio < 2.2, str(r)


def test_timeit_reports_median_min_max():
    t = timeit(_work, repeats=3, min_time=0.005)
    assert t["min_s"] <= t["median_s"] <= t["max_s"]
    assert t["repeats"] == 3


@pytest.mark.parametrize("kwargs, err", [
    (dict(candidate=1, baseline=_work), TypeError),
    (dict(candidate=_work, baseline=_work, pairs=0), ValueError),
    (dict(candidate=_work, baseline=_work, min_time=0), ValueError),
    (dict(candidate=_work, baseline=_work, threads=0), ValueError),
])
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        compare(**kwargs)


def test_write_results_records_machine_and_is_json(tmp_path):
    r = compare(_work, _work, pairs=3, min_time=0.002, name="x", meta={"shape": [3, 4]})
    machine = {"cpu_model": "test"}
    path = write_results(tmp_path / "out.json", "unit", [r], machine=machine)
    doc = json.loads(path.read_text())
    assert doc["schema"] == "sparsewise.bench/1"
    assert doc["machine"] == machine
    assert doc["results"][0]["name"] == "x"
    assert doc["results"][0]["meta"] == {"shape": [3, 4]}
    assert set(doc["results"][0]) >= {"ratio", "ratio_min", "ratio_max", "candidate_s", "baseline_s", "threads"}
