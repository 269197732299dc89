import json
import subprocess
import sys

import pytest

from sparsewise.cli import main


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sparsewise", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["report", "--threads", "0"],
    ["report", "--threads", "two"],
    ["report", "--out", "/proc/cannot/write"],
    ["probe", "--json", "/proc/cannot/write.json"],
    ["bench", "nosuchsuite"],
    ["frobnicate"],
])
def test_bad_input_is_one_clear_line(args):
    out = _run(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("sparsewise")


def test_not_built_commands_say_so(capsys):
    assert main(["advise"]) == 3
    assert "not built yet" in capsys.readouterr().err


def test_probe_json(tmp_path):
    out = _run("probe", "--quick", "--json", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["schema"] == "sparsewise.probe/2"
    assert "memory read" in out.stdout


def test_report_writes_self_contained_html(tmp_path):
    # ~9-10 min on a 2-core AVX2 host without AVX-512 (session 38): too close to the default 600 s
    out = _run("report", "--quick", "--no-progress", "--out", str(tmp_path / "rep"), timeout=1500)
    assert out.returncode == 0, out.stderr
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "data:image/png;base64," in html  # plots embedded, no side files
    assert "This machine" in html and "Three kinds of zeros" in html and "Embedding bags" in html
    assert "Mixture-of-Experts" in html
    assert "src=\"http" not in html
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["probe"]["schema"] == "sparsewise.probe/2"
    assert "report written to" in out.stdout
