import json

import pytest

from sparsewise.bench import PairedResult, compare, timeit, write_results


def _work(n=30000):
    s = 0
    for i in range(n):
        s += i * i
    return s


def test_same_function_gives_ratio_near_one():
    r = compare(_work, _work, pairs=7, min_time=0.01, name="A vs A")
    assert isinstance(r, PairedResult)
    assert 0.8 < r.ratio < 1.25, str(r)
    assert r.ratio_min <= r.ratio <= r.ratio_max
    assert r.pairs == 7 and r.inner >= 1 and r.threads >= 1


def test_twice_the_work_is_detected_as_about_2x():
    r = compare(_work, lambda: (_work(), _work()), pairs=7, min_time=0.01)
    assert 1.6 < r.ratio < 2.5, str(r)
    # swapped roles: the candidate is now the slow one
    r2 = compare(lambda: (_work(), _work()), _work, pairs=7, min_time=0.01)
    assert 0.4 < r2.ratio < 0.62, str(r2)


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
