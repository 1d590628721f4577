"""The GPU path in one run: fixture parity, bf16/fp16 drift, sdpa vs eager, device_map splits, bitsandbytes, vLLM
and `omnilmm-bench`, written to one report. On a CUDA machine (the H200 the project can borrow: torch 2.11,
transformers 5.17, no network) it takes a few minutes; `--device cpu` runs the same checks at smoke sizes, which is
how CI keeps the script from rotting.

    python scripts/gpu_check.py --device cuda --out gpu_report.md     # exit status 1 when a check fails

Each check is PASS, FAIL or SKIP (with the reason: no bitsandbytes, no vLLM, no GPU ...). The fixture is the tiny
original-format checkpoint in ../shared/fixtures, converted here; its reference numbers come from the original code.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT.parent / "shared" / "fixtures" / "omnilmm-tiny-original"
CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
IMAGE = "photo_640x480"


def fixture_pixels(name: str) -> torch.Tensor:
    """The original eval transform, read off the fixture's own resized PNG: `(1, 3, 448, 448)`."""
    array = np.array(Image.open(TINY / "images" / f"{name}.resized.png").convert("RGB"))
    return ((torch.from_numpy(array).permute(2, 0, 1).float() / 255 - CLIP_MEAN) / CLIP_STD)[None]


class Report:
    def __init__(self, device: str):
        self.device, self.rows, self.started = device, [], time.perf_counter()

    def check(self, name: str, function) -> None:
        """Run `function() -> (passed: bool | None, details: str)`; None = skipped. An exception is a FAIL."""
        started = time.perf_counter()
        try:
            passed, details = function()
        except Exception as error:  # noqa: BLE001 - the report names it and goes on
            passed, details = False, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[passed]
        self.rows.append({"check": name, "verdict": verdict, "seconds": round(time.perf_counter() - started, 1),
                          "details": details})
        print(f"{verdict:4}  {name} ({self.rows[-1]['seconds']} s): {details.splitlines()[0] if details else ''}",
              flush=True)

    def markdown(self) -> str:
        import timm
        import transformers

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        lines = [f"# OmniLMM GPU check on {self.device}", "",
                 f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
                 f"GPU: {gpu}; {time.perf_counter() - self.started:.0f} s in all", "",
                 "| check | result | s | details |", "|---|---|---|---|"]
        for row in self.rows:
            details = row["details"].replace("\n", " ").replace("|", "/")
            lines.append(f"| {row['check']} | {row['verdict']} | {row['seconds']} | {details} |")
        return "\n".join(lines) + "\n"


def load(folder, device, dtype=torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype, **kwargs)
    return (model if "device_map" in kwargs or "quantization_config" in kwargs else model.to(device)).eval()


def fixture_logits(model, expected, device):
    ids = expected["case_image.input_ids"].long().to(device)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=fixture_pixels(IMAGE).to(device)).logits[0].float().cpu()


def greedy_tokens(model, expected, device, n=12):
    ids = expected["case_image.input_ids"].long().to(device)
    with torch.no_grad():
        out = model.generate(ids, pixel_values=fixture_pixels(IMAGE).to(device), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n)
    return out[0, ids.shape[1] :].tolist()


def check_parity(folder, expected, device):
    model = load(folder, device)
    with torch.no_grad():
        features = model.get_vision_embedding(fixture_pixels(IMAGE).to(device))[0].cpu()
    diffs = {"vision": float((features - expected[f"vision.{IMAGE}"]).abs().max()),
             "logits": float((fixture_logits(model, expected, device) - expected["case_image.logits"]).abs().max())}
    same = greedy_tokens(model, expected, device) == expected["case_generate.new_tokens"].long().tolist()
    passed = diffs["vision"] <= 1e-5 and diffs["logits"] <= 1e-3 and same
    return passed, (f"fp32: resampler features {diffs['vision']:.1e} (tolerance 1e-5), logits {diffs['logits']:.1e} "
                    f"(1e-3), 12 greedy tokens {'identical' if same else 'DIFFERENT'} to the original's")


def check_half_precision(folder, expected, device):
    reference = fixture_logits(load(folder, device), expected, device)
    parts, passed = [], True
    for dtype in (torch.bfloat16, torch.float16):
        logits = fixture_logits(load(folder, device, dtype), expected, device)
        drift = float((logits - reference).abs().max())
        top1 = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
        passed &= bool(torch.isfinite(logits).all()) and top1 >= 0.9
        parts.append(f"{str(dtype)[6:]}: max logit drift {drift:.2e} (logits reach {reference.abs().max():.0f}), "
                     f"top-1 agreement {top1:.0%}")
    return passed, "; ".join(parts) + " (pass: finite, top-1 >= 90%)"


def check_attention(folder, expected, device):
    sdpa = fixture_logits(load(folder, device, attn_implementation="sdpa"), expected, device)
    eager = fixture_logits(load(folder, device, attn_implementation="eager"), expected, device)
    drift = float((sdpa - eager).abs().max())
    return drift <= 1e-3, f"fp32 logits, sdpa vs eager: {drift:.1e} (tolerance 1e-3)"


def check_device_map(folder, expected, device, workdir):
    """Half the decoder and the vision tower away from the first device: the GPU and the CPU on CUDA, the CPU and
    disk offload on a CPU. Greedy tokens must equal the single-device run's."""
    reference = greedy_tokens(load(folder, device), expected, device)
    near, far = (0, "cpu") if device == "cuda" else ("cpu", "disk")
    device_map = {"model.embed_tokens": near, "model.rotary_emb": near, "model.layers.0": near,
                  "model.layers.1": far, "model.norm": near, "model.vision_tower": far, "model.resampler": near,
                  "lm_head": near}
    model = load(folder, device, device_map=device_map, offload_folder=str(workdir / "offload"))
    tokens = greedy_tokens(model, expected, "cuda" if device == "cuda" else "cpu")
    placed = sorted({str(v) for v in model.hf_device_map.values()})
    return tokens == reference, f"split over {placed}: greedy tokens {'equal' if tokens == reference else 'DIFFER'}"


def check_bitsandbytes(folder, expected, device):
    if device != "cuda":
        return None, "bitsandbytes 4/8-bit loading is a CUDA path; run with --device cuda"
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        return None, f"bitsandbytes is not installed ({error}); pip install bitsandbytes (its wheel is ~60 MB)"
    reference = fixture_logits(load(folder, device, torch.bfloat16), expected, device)
    parts = []
    for name, config in (("8-bit", BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["model.vision_tower",
                                                                                                "model.resampler",
                                                                                                "lm_head"])),
                         ("4-bit", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                                      llm_int8_skip_modules=["model.vision_tower", "model.resampler",
                                                                             "lm_head"]))):
        model = load(folder, device, torch.bfloat16, quantization_config=config, device_map={"": 0})
        logits = fixture_logits(model, expected, device)
        tokens = greedy_tokens(model, expected, device)
        parts.append(f"{name}: logit drift vs bf16 {float((logits - reference).abs().max()):.2e}, "
                     f"{len(tokens)} greedy tokens generated")
    return True, "; ".join(parts)


def check_vllm(folder, device):
    """vLLM's offline engine (the `omnilmm` plugin) on the converted fixture and the demo model: the same prompt ids
    and greedy tokens as `generate` on one image question. A CUDA check: on a CPU, tests/vllm checks the same in
    `.venv-vllm`."""
    if device != "cuda":
        return None, "a CUDA check (vLLM's CPU build is tested by tests/vllm, in .venv-vllm)"
    try:
        from vllm import LLM
    except ImportError:
        return None, "vLLM is not installed: pip install -e '.[vllm]'"
    from transformers import AutoProcessor

    from omnilmm_tools.vllm_check import greedy, hf_greedy, vllm_messages

    image, lines, passed = Image.open(TINY / "images" / f"{IMAGE}.png").convert("RGB"), [], True
    content = [image, "What is in the picture?"]
    for name, path in (("fixture", folder), ("demo model", ROOT / "demo_model")):
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        with torch.no_grad():
            prompt_ids, expected, _ = hf_greedy(load(path, device), processor, content, max_new_tokens=12)
        llm = LLM(str(path), trust_remote_code=True, dtype="float32", gpu_memory_utilization=0.3,
                  max_model_len=2048, seed=0)
        result = llm.chat(vllm_messages(content), greedy(llm, 12))[0]
        same_prompt = result.prompt_token_ids == prompt_ids
        same = [t for t in result.outputs[0].token_ids if t != processor.tokenizer.eos_token_id] == expected
        passed = passed and same_prompt and same
        lines.append(f"{name}: prompt ids {'equal' if same_prompt else 'DIFFERENT'}, 12 greedy tokens "
                     f"{'equal' if same else 'DIFFERENT'}")
        llm.llm_engine.engine_core.shutdown()
        del llm
    return passed, "vLLM offline engine against generate (fp32): " + "; ".join(lines)


def check_bench(device):
    arguments = ["--smoke"] if device == "cpu" else ["--device", "cuda", "--skip-convert"]
    result = subprocess.run([sys.executable, "-m", "omnilmm_tools.bench", *arguments], capture_output=True,
                            text=True, timeout=420)
    summary = result.stdout.split("== Summary", 1)[-1].strip()
    if result.returncode != 0:
        return False, f"omnilmm-bench exited {result.returncode}: {result.stderr[-1500:]}"
    fails = [line.strip() for line in summary.splitlines()[2:] if line.rstrip().endswith("FAIL")]
    details = f"omnilmm-bench {' '.join(arguments)}:\n" + summary
    if device == "cpu":  # smoke sizes mean nothing: the run itself is the check
        return True, details
    return not fails, details


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="gpu_report.md", help="the report (Markdown; a .json next to it)")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the omnilmm-bench run")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU; use --device cpu")
    from safetensors.torch import load_file

    from omnilmm_tools.convert import convert

    workdir = Path(tempfile.mkdtemp(prefix="omnilmm-gpu-check-"))
    folder = convert(TINY / "original", workdir / "omnilmm-tiny")
    expected = load_file(str(TINY / "expected.safetensors"))
    report = Report(args.device)
    report.check("fixture parity (fp32)", lambda: check_parity(folder, expected, args.device))
    report.check("bf16 and fp16 against fp32", lambda: check_half_precision(folder, expected, args.device))
    report.check("sdpa against eager", lambda: check_attention(folder, expected, args.device))
    report.check("device_map split", lambda: check_device_map(folder, expected, args.device, workdir))
    report.check("bitsandbytes 8-bit and 4-bit", lambda: check_bitsandbytes(folder, expected, args.device))
    report.check("vLLM offline engine", lambda: check_vllm(folder, args.device))
    if not args.skip_bench:
        report.check("omnilmm-bench", lambda: check_bench(args.device))
    Path(args.out).write_text(report.markdown())
    Path(args.out).with_suffix(".json").write_text(json.dumps(report.rows, indent=1) + "\n")
    print(f"wrote {args.out}")
    return int(any(row["verdict"] == "FAIL" for row in report.rows))


if __name__ == "__main__":
    sys.exit(main())
