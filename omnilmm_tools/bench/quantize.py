"""Comparison 8 of `omnilmm-bench`: weight-only quantization."""

import gc
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import (
    Bench,
    build_processor,
    cpu_features,
    describe,
    fmt_s,
    folder_bytes,
    header,
    image_questions,
    median,
    omnilmm_config,
    random_model,
    tensor_bytes,
    vm_status,
)


class StepClock:
    """A `generate` stopping criterion that stops nothing and notes when each new token is chosen: one call gives
    the prefill's time (to the first token) and the decoding steps' (the rest)."""

    def __init__(self):
        self.started, self.steps = time.perf_counter(), []

    def __call__(self, input_ids, scores, **kwargs):
        self.steps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def quantized_run(folder, precision, new_tokens, reps, out):
    """One contender of comparison 8, in a fresh process: load `folder` (fp32 or bf16: a full-precision folder in
    that dtype; int8 or int4: a folder `omnilmm-quantize` wrote, as it is: it computes in the faster of the two on
    this CPU) and answer one image question greedily; write to `out` (a torch file) its weight bytes, its loading
    peak over the process's baseline (the imports, the processor and the question), the whole question's time, a
    decoding step's time, its tokens and logits, and the dtype it computed in."""
    from transformers import AutoModelForCausalLM, AutoProcessor, StoppingCriteriaList

    new_tokens, reps = int(new_tokens), int(reps)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompts, images = image_questions(processor, 1)
    inputs = processor(text=prompts, images=[images], return_tensors="pt")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = vm_status("VmRSS")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    peak = vm_status("VmHWM") - baseline
    weights = sum(tensor_bytes(tensor) for tensor in model.state_dict().values())
    computes = model.model.norm.weight.dtype

    def answer(n):
        """The question answered with `n` new tokens, and the clock of its steps."""
        clock = StepClock()
        with torch.no_grad():  # (quanto's int4 weights fail under inference_mode: "Cannot set version_counter")
            output = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([clock]))
        return output, clock

    answer(1)  # the warm-up
    questions, steps = [], []
    for _ in range(reps):
        output, clock = answer(new_tokens)
        questions.append(clock.steps[-1] - clock.started)
        steps.append((clock.steps[-1] - clock.steps[0]) / max(1, new_tokens - 1))
    torch.save({"weights": weights, "peak": peak, "question_s": median(questions), "decode_s": median(steps),
                "tokens": output.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
                "logits": output.logits[0].float(), "computes": str(computes).removeprefix("torch.")}, out)


def run_quantize_command(src: Path, dst: Path, weights: str) -> tuple[float, int]:
    """`omnilmm-quantize src dst --weights ...` in its own process: its time and its peak resident memory."""
    code = ("import sys; from omnilmm_tools.quantize import main; from omnilmm_tools.bench.common import vm_status; "
            "main(sys.argv[1:]); print('VmHWM', vm_status('VmHWM'))")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(src), str(dst), "--weights", weights],
                            capture_output=True, text=True, cwd=str(Path(__file__).parent.parent.parent))
    if result.returncode != 0:
        raise RuntimeError(f"omnilmm-quantize --weights {weights} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, int(result.stdout.split("VmHWM")[-1])


def bench_quantization(bench: Bench, workdir: Path):
    """A laptop's question, on one random decoder-heavy folder: fp32 and bf16 (the full-precision folder) against
    the int4 folder `omnilmm-quantize` writes (optimum-quanto, weight-only), each in its own process on the CPU:
    the weights' bytes, the loading peak against them, and the time of a whole image question (prefill and
    decoding) against the fastest full precision on this CPU; the int4 answer's agreement with bf16."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        raise SystemExit("comparison 8 (quantize) needs optimum-quanto: pip install -e '.[quantization]'") from None
    from ..finetune import save_hub_folder

    sizes, reps = bench.preset["quantize"], bench.preset["reps"]["quantize"]
    new_tokens = bench.preset["new_tokens"]["quantize"]
    header(f"8. Weight-only quantization (omnilmm-quantize, optimum-quanto) on the CPU ({describe(sizes)})")
    print(f"  CPU: {cpu_features()}")
    folder = workdir / "quantize"
    model = random_model(omnilmm_config(sizes), torch.device("cpu"), torch.bfloat16)
    largest = max(tensor_bytes(tensor) for tensor in model.state_dict().values())
    save_hub_folder(model, build_processor(slice_mode=False), folder)
    del model
    gc.collect()
    quantized = workdir / "quantize-int4"
    seconds, command_peak = run_quantize_command(folder, quantized, "int4")
    results = {}
    for precision, path in (("fp32", folder), ("bf16", folder), ("int4", quantized)):
        out = workdir / f"{precision}.pt"
        code = "import sys; from omnilmm_tools.bench.quantize import quantized_run; quantized_run(*sys.argv[1:])"
        result = subprocess.run([sys.executable, "-c", code, str(path), precision, str(new_tokens), str(reps),
                                 str(out)], capture_output=True, text=True, cwd=str(Path(__file__).parent.parent.parent))
        if result.returncode != 0:
            raise RuntimeError(f"the {precision} run failed:\n{result.stderr[-3000:]}")
        results[precision] = torch.load(out)
    fp32, bf16, int4 = results["fp32"], results["bf16"], results["int4"]
    fastest = min(("fp32", "bf16"), key=lambda precision: results[precision]["question_s"])
    drift = float((int4["logits"] - bf16["logits"]).abs().max())
    files = folder_bytes(quantized), folder_bytes(folder)
    bench.add("8 quantization", "int4 weights / bf16 (the files; embedding, LM head, resampler in bf16)",
              files[0] / files[1], "<= 0.35",
              f"{files[0] / 1e9:.2f} GB vs {files[1] / 1e9:.2f} GB; in memory {int4['weights'] / 1e9:.2f} GB vs "
              f"{bf16['weights'] / 1e9:.2f} GB (int4's other layers compute in {int4['computes']} on this CPU); "
              f"omnilmm-quantize took {seconds:.0f} s and peaked at {command_peak / 1e9:.2f} GB resident (the largest "
              f"tensor: {largest / 1e6:.0f} MB)")
    bench.add("8 quantization", "int4 loading peak / its weights (over the process's baseline)",
              int4["peak"] / int4["weights"], "<= 1.25",
              f"{int4['peak'] / 1e9:.2f} GB while loading the int4 folder (the bf16 folder: fp32 {fp32['peak'] / 1e9:.2f}"
              f" GB, bf16 {bf16['peak'] / 1e9:.2f} GB)")
    bench.add("8 quantization", f"int4 whole image question / fastest full precision ({fastest})",
              int4["question_s"] / results[fastest]["question_s"], "< 1.00",
              f"one image question, {new_tokens} new tokens: {fmt_s(int4['question_s'])} vs fp32 "
              f"{fmt_s(fp32['question_s'])}, bf16 {fmt_s(bf16['question_s'])}; a decoding step "
              f"{fmt_s(int4['decode_s'])} vs fp32 {fmt_s(fp32['decode_s'])}, bf16 {fmt_s(bf16['decode_s'])}; greedy "
              f"tokens {'equal' if int4['tokens'] == bf16['tokens'] else 'differ'} (random weights), first-step "
              f"logit drift {drift:.3f} (logits reach {float(bf16['logits'].abs().max()):.2f})")
