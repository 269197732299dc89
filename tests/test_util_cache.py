import json

from sparsewise._util import cached_measurement


def test_cached_measurement_measures_once_and_survives_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return 7

    assert cached_measurement("m.json", "k", measure) == 7
    assert cached_measurement("m.json", "k", measure) == 7
    assert len(calls) == 1
    assert cached_measurement("m.json", "k", measure, refresh=True) == 7 and len(calls) == 2
    (tmp_path / "m.json").write_text("[1, 2")  # damaged file: measured again, rewritten whole
    assert cached_measurement("m.json", "k", lambda: 9) == 9
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": 9}
