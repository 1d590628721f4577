"""`omnilmm-bench --smoke` runs every comparison at tiny sizes and prints each ratio next to its target."""

import re
import shutil

import pytest

from omnilmm_tools import bench
from omnilmm_tools.bench import video as bench_video

EXPECTED_ROWS = {
    "1 preprocessing": 4,  # 2 photo sizes x (LLaVA-NeXT PIL, LLaVA-NeXT torchvision)
    "2 vision": 1,
    "3 generation overhead": 1,
    "4 multi-turn": 1,
    "5 batched generation": 1,
    "6 conversion": 1,
    "6 loading": 2,
    "8 quantization": 3,  # int4: weights, loading peak and a whole question's time
    "9 video": 6,  # decoding (2 keyframe intervals), tokens and encoding per second of video (num_query 64, 256)
}
# ours / MiniCPM-V's decord recipe, / vLLM's OpenCV loader, / torchcodec, for both clips, where those are installed
VLLM_OPENCV = bench_video.optional("vllm.multimodal.video") and bench_video.optional("cv2")
TORCHCODEC = bench_video.torchcodec_decodes()
EXPECTED_ROWS["9 video"] += 2 * (bench_video.optional("decord") + VLLM_OPENCV + TORCHCODEC)
# the page's last and first token against chat()'s, where Gradio, Playwright and chromium are installed
WEB_DEMO = bench_video.optional("gradio") and bench_video.optional("playwright.sync_api") and shutil.which("chromium")
if WEB_DEMO:
    EXPECTED_ROWS["10 web demo"] = 2
ROW = re.compile(r"^\s+(.+?)\s+ratio\s+(\d+\.\d+)\s+target\s+(<=|>=|<|>|info)\s*(\d+\.\d+)?\s+(PASS|FAIL|INFO)", re.M)
SUMMARY = re.compile(r"^  (\d+ [a-z -]+?)\s{2,}.+?\s(\d+\.\d{3})\s+(?:(<=|>=|<|>) \d+\.\d+|info)\s+(PASS|FAIL|INFO)$", re.M)


@pytest.fixture(scope="module")
def smoke_output(tmp_path_factory):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(["--smoke", "--workdir", str(tmp_path_factory.mktemp("bench"))]) == 0
    return out.getvalue()


def test_smoke_prints_every_comparison_with_a_ratio_and_a_verdict(smoke_output):
    for title in ("== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6.", "== 8.", "== 9.", "== Summary"):
        assert title in smoke_output, f"{title} missing from:\n{smoke_output}"
    assert re.search(r"CPU: .+AVX2 (yes|no), AVX-512 (yes|no), AVX-512 BF16 (yes|no), AMX (yes|no)", smoke_output)
    rows = ROW.findall(smoke_output)
    assert len(rows) == sum(EXPECTED_ROWS.values()), smoke_output
    for _, ratio, _, _, _ in rows:
        assert float(ratio) >= 0  # (a delay row is 0 when there is none)
    summary = smoke_output.split("== Summary", 1)[1]
    counts = {}
    for comparison, _, _, _ in SUMMARY.findall(summary):
        counts[comparison] = counts.get(comparison, 0) + 1
    assert counts == EXPECTED_ROWS, summary


def test_rows_judge_their_targets():
    assert bench.Row("x", "y", 1.04, "<= 1.05").passed
    assert not bench.Row("x", "y", 1.06, "<= 1.05").passed
    assert bench.Row("x", "y", 1.5, ">= 1.50").passed
    assert not bench.Row("x", "y", 1.0, "> 1.00").passed
    assert bench.Row("x", "y", 1.0, "info").passed is None and bench.Row("x", "y", 1.0, "info").verdict == "INFO"


def test_vision_batching_is_information_on_a_cpu(smoke_output):
    row = next(line for line in smoke_output.splitlines() if "batched get_vision_embedding speed-up" in line)
    assert "target info" in row and "INFO" in row, row


def test_skip_convert_and_only_select_comparisons(capsys):
    assert bench.main(["--smoke", "--only", "vision,convert", "--skip-convert"]) == 0
    output = capsys.readouterr().out
    assert "== 2." in output and "== 1." not in output and "== 6." not in output
