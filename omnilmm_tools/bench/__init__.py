"""`omnilmm-bench`: OmniLMM measured side by side against its peers and against the limit.

Every comparison runs both contenders in the same process, alternating (A, B, A, B, ...) for several repetitions,
and reports medians and the median of the per-repetition ratios, next to its target and PASS/FAIL:

1. image preprocessing (slice mode, 9 tiles), our PIL and torchvision classes against LLaVA-NeXT's of the same backend;
2. vision encoding of a 9-tile image: batched `get_vision_embedding` against one tile at a time (the original's way);
3. generation overhead: `generate` with an image (precomputed features) against plain `MistralForCausalLM.generate`
   on the same decoder weights and the same prompt length given as `inputs_embeds`;
4. multi-turn: a second `chat()` turn about the same image (vision features reused) against a text-only turn of the
   same length;
5. batched generation: a batch of 8 prompts against 8 calls of one;
6. conversion and loading: peak RSS of `omnilmm-convert` on a >= 2 GB original-format checkpoint, and
   `from_pretrained` of the converted folder against a LLaVA-NeXT folder (CLIP + Mistral) of the same size;
7. serving (needs vLLM: `.venv-vllm`): 32 image+text prompts through vLLM's offline engine against one batched
   `generate`, same folder, same greedy tokens; then `vllm serve` of the folder under 1, 8 and 64 concurrent clients
   (latency p50/p95, throughput) against the offline engine on the same requests in batches of that size;
8. weight-only quantization (optimum-quanto): resident memory and decode speed of int8 and int4 against bf16, the
   greedy tokens' agreement and the logit drift;
9. video (`omnilmm_tools.bench.video`, needs PyAV): decoding and sampling a 3-minute 720p clip to 64 frames against
   decoding every frame (and MiniCPM-V's decord recipe, vLLM's OpenCV loader, where installed), and the tokens and
   vision encoding time a second of video costs;
10. the web demo (`omnilmm_tools.bench.demo`, needs Gradio, Playwright and chromium): an answer through the page in
   headless Chromium against `chat()` called directly.

The model is random (no download), at the sizes of `--preset` (see `PRESETS`; `--smoke` = tiny, seconds).
"""

import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..cli import Parser, positive_int, torch_device
from .batched import bench_batched
from .common import (
    BATCH,
    CPU_FEATURES,
    MIN_CHECKPOINT_BYTES,
    NUM_QUERY,
    PRESETS,
    REAL_EVA,
    VOCAB_SIZE,
    Bench,
    Row,
    build_processor,
    cpu_features,
    decoding_ceiling,
    describe,
    fill_random_,
    fmt_s,
    folder_bytes,
    gemm_ceiling,
    header,
    image_prompt_ids,
    image_questions,
    import_baseline_rss,
    machine_line,
    median,
    mistral_twin,
    omnilmm_config,
    paired_ratio,
    random_model,
    run_sampled,
    synthetic_photo,
    tensor_bytes,
    vm_status,
)
from .convert import (
    ADDED_TOKENS,
    bench_convert_and_load,
    run_converter,
    run_converter_in_process,
    write_llava_next,
    write_original_checkpoint,
)
from .multiturn import bench_multiturn
from .overhead import bench_generation_overhead
from .preprocess import bench_preprocessing
from .quantize import StepClock, bench_quantization, quantized_run, run_quantize_command
from .serving import SERVING_PROMPTS, bench_serving
from .vision import bench_vision, tile_pixels

__all__ = [
    "ADDED_TOKENS", "BATCH", "COMPARISONS", "CPU_FEATURES", "DEFAULT_COMPARISONS", "MIN_CHECKPOINT_BYTES", "NUM_QUERY",
    "PRESETS", "REAL_EVA", "SERVING_PROMPTS", "VOCAB_SIZE", "Bench", "Row", "StepClock", "bench_batched",
    "bench_convert_and_load", "bench_generation_overhead", "bench_multiturn", "bench_preprocessing",
    "bench_quantization", "bench_serving", "bench_vision", "build_processor", "cpu_features", "decoding_ceiling",
    "describe", "fill_random_", "fmt_s", "folder_bytes", "gemm_ceiling", "header", "image_prompt_ids",
    "image_questions", "import_baseline_rss", "machine_line", "main", "median", "mistral_twin", "omnilmm_config",
    "paired_ratio", "quantized_run", "random_model", "run_converter", "run_converter_in_process",
    "run_quantize_command", "run_sampled", "synthetic_photo", "tensor_bytes", "tile_pixels", "vm_status",
    "write_llava_next", "write_original_checkpoint",
]


COMPARISONS = ("preprocess", "vision", "overhead", "multiturn", "batched", "convert", "quantize", "video", "demo",
               "serving")
DEFAULT_COMPARISONS = COMPARISONS[:-1]  # serving needs vLLM's environment: `--only serving` there


def main(argv=None) -> int:
    parser = Parser("omnilmm-bench", __doc__.split("\n\n")[0])
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu or cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that everything runs")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="sizes (default: cpu on CPU, gpu on CUDA)")
    parser.add_argument("--skip-convert", action="store_true", help="leave out comparison 6 (writes ~7 GB of files)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(COMPARISONS)} (default: all but serving)")
    parser.add_argument("--reps", type=positive_int, help="timed repetitions of every comparison (default: the preset's)")
    parser.add_argument("--workdir", help="where the temporary checkpoints go (default: a new temp folder)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    preset_name = "smoke" if args.smoke else args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = json.loads(json.dumps(PRESETS[preset_name]))
    if args.reps:
        preset["reps"] = {key: args.reps for key in preset["reps"]}
    selected = DEFAULT_COMPARISONS if not args.only else tuple(c.strip() for c in args.only.split(","))
    unknown = set(selected) - set(COMPARISONS)
    if unknown:
        parser.error(f"unknown comparisons {sorted(unknown)}; choose from {COMPARISONS}")
    if args.skip_convert:
        selected = tuple(c for c in selected if c != "convert")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    bench = Bench(device=device, preset=preset, smoke=args.smoke)
    started = time.perf_counter()
    print(f"omnilmm-bench, preset {preset_name!r} on {device}: {machine_line(device)}")
    print(f"model: {describe(preset['model'])}")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    if "preprocess" in selected:
        bench_preprocessing(bench)
    if {"vision", "overhead", "multiturn", "batched"} & set(selected):
        t0 = time.perf_counter()
        model = random_model(omnilmm_config(preset["model"]), device, dtype)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"\n(random model: {params / 1e6:.0f} M parameters, {params * model.dtype.itemsize / 1e6:.0f} MB in "
            f"{str(model.dtype).replace('torch.', '')}, built in {time.perf_counter() - t0:.1f} s)"
        )
        processor = build_processor()
        if "vision" in selected:
            bench_vision(bench, model)
        if "overhead" in selected:
            bench_generation_overhead(bench, model, mistral_twin(model), processor)
        if "multiturn" in selected:
            bench_multiturn(bench, model, processor)
        if "batched" in selected:
            bench_batched(bench, model, processor)
        del model
        gc.collect()
    if "video" in selected:
        from .video import bench_video

        bench_video(bench, preset_name)
    from .demo import bench_demo

    for name, run_in_workdir in (("convert", bench_convert_and_load), ("quantize", bench_quantization),
                                 ("demo", bench_demo), ("serving", bench_serving)):
        if name in selected:
            workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="omnilmm-bench-"))
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                run_in_workdir(bench, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n== Summary ({preset_name} preset, {device}, {time.perf_counter() - started:.0f} s)")
    print(f"  {'comparison':<22} {'measure':<62} {'ratio':>7}  {'target':<7}  result")
    for row in bench.rows:
        print(f"  {row.comparison:<22} {row.what:<62} {row.value:7.3f}  {row.target:<7}  {row.verdict}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [dict(comparison=r.comparison, what=r.what, ratio=r.value, target=r.target, passed=r.passed,
                      details=r.details) for r in bench.rows],
                indent=2,
            )
        )
    return 0
