"""benchmarks/gpu_check.py without a GPU: one line and exit 0; its stages' plumbing at toy sizes on CPU
(--cpu-smoke), and a budget too short keeps the report with every stage marked out of time."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines() == [
        "gpu-check: needs a CUDA GPU (none found here); nothing run. The CPU checks are `make test`."]


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_smoke_runs_the_stages_and_writes_the_report(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--only", "environment", "te_vs_local",
                          "rotary", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert run.returncode == 0, json.dumps(report, indent=1)[-3000:]
    assert [(name, stage["outcome"]) for name, stage in report["stages"].items()] == [
        ("environment", "ok"), ("te_vs_local", "ok"), ("rotary", "ok")]
    te = report["stages"]["te_vs_local"]["result"]
    assert te["passed"] and te["plain"]["max_abs_difference"] == 0.0 == te["pose"]["max_abs_difference"]
    rows = report["stages"]["rotary"]["result"]["rows"]
    assert {row["seq_length"] for row in rows} == {256, 512} and all(row["forward_s"] > 0 for row in rows)
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| te_vs_local | ok |" in text and "## rotary" in text and "| case |" in text


@pytest.mark.slow
def test_a_budget_too_short_keeps_the_report_with_stages_out_of_time(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--budget-s", "1", "--only", "rotary", "mfu",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [stage["outcome"] for stage in report["stages"].values()] == ["out of time", "out of time"]
    assert "| rotary | out of time |" in (tmp_path / "gpu_check.md").read_text()
