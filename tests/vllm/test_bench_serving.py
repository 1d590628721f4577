"""`omnilmm-bench --only serving` runs vLLM and batched `generate` on the same prompts and reports the ratio, then
`vllm serve` under 1, 8 and 64 concurrent clients against the offline engine."""

import re
import subprocess
import sys


def test_serving_comparison_runs_and_both_give_the_same_greedy_tokens(tmp_path):
    result = subprocess.run([sys.executable, "-m", "omnilmm_tools.bench", "--smoke", "--only", "serving",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = re.search(r"throughput vLLM / batched generate.*ratio\s+(\d+\.\d+)\s+target info", result.stdout)
    assert row and float(row.group(1)) > 0, result.stdout
    # and against vLLM's own bound (its text decoding of the same lengths), measured in the same run
    bound = re.search(r"throughput vLLM / its own bound.*ratio\s+(\d+\.\d+)\s+target >= 0\.90", result.stdout)
    assert bound and float(bound.group(1)) > 0 and "as fast as vLLM decodes 32 text prompts" in result.stdout
    # both answer the same prompts with the same greedy tokens (the same folder, the plain LM head as reference)
    assert "same greedy tokens for 32 of 32 prompts" in result.stdout, result.stdout
    # the time is split into images + prefill and decoding, each a duration (never negative, even from noise)
    split = re.search(r"take (\d+) ms in vLLM and (\d+) ms in generate; the 1 decoding steps after it take "
                      r"(\d+) ms and (\d+) ms \((\d+\.\d+x|too short to compare)\)", result.stdout)
    assert split, result.stdout
    # `vllm serve` of the same folder under 1, 8 and 64 concurrent clients: latency and throughput at each level,
    # against the offline engine on the same requests in batches of that size, with the same greedy answers
    for level in (1, 8, 64):
        row = re.search(rf"vllm serve, {level} concurrent clients: throughput / offline engine\s+ratio\s+(\d+\.\d+)"
                        r"\s+target >= \d\.\d+.*\n\s+(\d+) image requests x 2 new tokens: latency p50 \d+ ms, "
                        r"p95 \d+ ms; .* requests/s, .* tok/s .*; the offline engine in batches of \d+: \d+ ms; "
                        r"same text for (\d+) of (\d+)", result.stdout)
        assert row and float(row.group(1)) > 0, result.stdout
        assert int(row.group(2)) >= level and row.group(3) == row.group(4) == row.group(2), row.group(0)
