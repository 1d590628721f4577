"""scripts/gpu_check.py, the prepared GPU run, in its CPU mode: every check runs and writes its row of the report."""

import json
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_end_to_end_on_the_cpu_and_writes_its_report(tmp_path):
    report = tmp_path / "report.md"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--out",
                             str(report)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads(report.with_suffix(".json").read_text())}
    assert list(rows) == ["fixture parity (fp32)", "bf16 and fp16 against fp32", "sdpa against eager",
                          "device_map split", "bitsandbytes 8-bit and 4-bit", "vLLM offline engine", "omnilmm-bench"]
    verdicts = {name: row["verdict"] for name, row in rows.items()}
    assert verdicts.pop("bitsandbytes 8-bit and 4-bit") == "SKIP"  # CUDA paths: named as such on a CPU
    assert verdicts.pop("vLLM offline engine") == "SKIP" and "tests/vllm" in rows["vLLM offline engine"]["details"]
    assert set(verdicts.values()) == {"PASS"}, rows
    assert "12 greedy tokens identical to the original's" in rows["fixture parity (fp32)"]["details"]
    assert "split over ['cpu', 'disk']" in rows["device_map split"]["details"]
    text = report.read_text()
    assert text.startswith("# OmniLMM GPU check on cpu") and text.count("\n| ") == 8  # the header and 7 checks
