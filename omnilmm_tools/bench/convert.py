"""Comparison 6 of `omnilmm-bench`: conversion and loading."""

import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch

from .common import (
    MIN_CHECKPOINT_BYTES,
    NUM_QUERY,
    VOCAB_SIZE,
    Bench,
    fill_random_,
    fmt_s,
    folder_bytes,
    header,
    import_baseline_rss,
    median,
    omnilmm_config,
    paired_ratio,
    run_sampled,
)

ADDED_TOKENS = ["<im_patch>", "<im_start>", "<im_end>", "<box>", "</box>", "<ref>", "</ref>", "<quad>", "</quad>"]


def write_original_checkpoint(folder: Path, sizes: dict) -> tuple[int, object]:
    """An original-format OmniLMM folder (`config.json`, bf16 `pytorch_model.bin`, `added_tokens.json`)."""
    from ..convert import expected_state_dict_shapes

    folder.mkdir(parents=True)
    config = omnilmm_config(sizes)
    shapes = expected_state_dict_shapes(config)
    state = {name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}
    fill_random_(list(state.values()))
    torch.save(state, folder / "pytorch_model.bin")
    size = sum(t.numel() * t.element_size() for t in state.values())
    del state
    gc.collect()
    config_dict = {
        "architectures": ["OmniLMMForCausalLM"], "model_type": "omnilmm", "torch_dtype": "bfloat16",
        "transformers_version": "4.35.0", "use_cache": False, "fully_tune": True, "tune_CLIP": True,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "image_size": 448,
        "mm_vision_tower": config.mm_vision_tower, "mm_use_im_start_end": True,
        "hidden_size": sizes["hidden_size"], "intermediate_size": sizes["intermediate_size"],
        "num_attention_heads": sizes["num_attention_heads"], "num_hidden_layers": sizes["num_hidden_layers"],
        "num_key_value_heads": sizes["num_key_value_heads"], "vocab_size": VOCAB_SIZE, "num_query": NUM_QUERY,
        "vision_tower_kwargs": dict(sizes["vision"]),
    }
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({t: 32000 + i for i, t in enumerate(ADDED_TOKENS)}))
    return size, config


def run_converter_in_process(src: Path, dst: Path):
    """`--smoke`: the converter's `main` in this process (no interpreter start-up), its RSS growth sampled."""
    from ..convert import main as convert_main

    def rss():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    baseline, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss() - baseline)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        convert_main([str(src), str(dst)])
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss() - baseline), time.perf_counter() - start, {"RssAnon": 0, "RssFile": 0}


def run_converter(src: Path, dst: Path):
    """Run the converter (what the `omnilmm-convert` console script runs, from this benchmark's own checkout) as a
    child process; return its peak RSS, wall time and sampled peaks."""
    command = [sys.executable, "-m", "omnilmm_tools.convert", str(Path(src).resolve()), str(Path(dst).resolve())]
    peaks, seconds, returncode, output = run_sampled(command, str(Path(__file__).resolve().parent.parent.parent))
    if returncode:
        raise RuntimeError(f"omnilmm-convert failed ({returncode}):\n{output[-3000:]}")
    return peaks["VmHWM"], seconds, peaks


def write_plain_mistral(folder: Path, sizes: dict, target_bytes: int) -> int:
    """A MistralForCausalLM folder (bf16 safetensors, 2 GB shards) with the decoder of `sizes` and a vocabulary
    sized so that the weights take `target_bytes`, like the converted OmniLMM folder."""
    from transformers import MistralConfig, MistralForCausalLM

    hidden = sizes["hidden_size"]
    config = MistralConfig(
        hidden_size=hidden, intermediate_size=sizes["intermediate_size"],
        num_attention_heads=sizes["num_attention_heads"], num_key_value_heads=sizes["num_key_value_heads"],
        num_hidden_layers=sizes["num_hidden_layers"], vocab_size=VOCAB_SIZE, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        probe = MistralForCausalLM(config)
    base = sum(p.numel() for p in probe.parameters()) * 2
    config.vocab_size = VOCAB_SIZE + max(0, round((target_bytes - base) / (2 * 2 * hidden)))
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        fill_random_([p.data for p in model.parameters()], seed=1)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    gc.collect()
    return folder_bytes(folder)


def bench_convert_and_load(bench: Bench, workdir: Path):
    from transformers import AutoModelForCausalLM, MistralForCausalLM

    sizes = bench.preset["checkpoint"]
    header("6. Conversion (peak RSS of omnilmm-convert) and from_pretrained time")
    src, dst, plain = workdir / "original", workdir / "converted", workdir / "mistral"
    started = time.perf_counter()
    checkpoint_bytes, _ = write_original_checkpoint(src, sizes)
    file_bytes = (src / "pytorch_model.bin").stat().st_size
    print(
        f"  original checkpoint: {file_bytes / 1e9:.2f} GB bf16 (EVA width {sizes['vision'].get('embed_dim', 1792)}, "
        f"{sizes['vision'].get('depth', 64) - 1} blocks kept; Mistral width {sizes['hidden_size']}, "
        f"{sizes['num_hidden_layers']} layers), written in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    if not bench.smoke and file_bytes < MIN_CHECKPOINT_BYTES:
        print(f"  warning: the checkpoint is smaller than {MIN_CHECKPOINT_BYTES / 1e9:.0f} GB")
    peak, seconds, peaks = (run_converter_in_process if bench.smoke else run_converter)(src, dst)
    floor = "" if bench.smoke else f"; importing torch+transformers+timm alone peaks at {import_baseline_rss() / 1e9:.2f} GB"
    bench.add(
        "6 conversion",
        "omnilmm-convert peak RSS / checkpoint size",
        peak / file_bytes,
        "<= 0.50",
        f"peak RSS {peak / 1e9:.2f} GB (sampled peaks: anonymous {peaks['RssAnon'] / 1e9:.2f} GB, file-backed incl. "
        f"mmap {peaks['RssFile'] / 1e9:.2f} GB) for a {file_bytes / 1e9:.2f} GB checkpoint, in {seconds:.0f} s{floor}",
    )
    (src / "pytorch_model.bin").unlink()  # free the disk before writing the plain folder
    converted_bytes = folder_bytes(dst)
    plain_bytes = write_plain_mistral(plain, sizes, converted_bytes)
    on_gpu = bench.device.type == "cuda"
    device_map = str(bench.device) if on_gpu else None
    # (a) what a user waits for: every weight read and materialised - float32 on a CPU (bf16 matmuls are slow
    # there), bf16 copied onto the GPU with --device cuda; (b) the bf16 call alone on a CPU, where safetensors are
    # memory-mapped and nothing is read yet: the fixed cost of building the model.
    settings = {
        "materialised": dict(dtype=torch.bfloat16 if on_gpu else torch.float32, device_map=device_map),
        "mmap": dict(dtype=torch.bfloat16, device_map=device_map),
    }
    sizes_note = (
        f"OmniLMM {converted_bytes / 1e9:.2f} GB, Mistral {plain_bytes / 1e9:.2f} GB on disk (bf16), page cache warm"
    )
    for kind, kwargs in settings.items():
        if kind == "mmap" and on_gpu:
            continue

        def timed(load):
            def run():
                started = time.perf_counter()
                model = load()
                run.times.append(time.perf_counter() - started)
                del model
                gc.collect()

            run.times = []
            return run

        ours = timed(lambda: AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, **kwargs))
        theirs = timed(lambda: MistralForCausalLM.from_pretrained(plain, **kwargs))
        reps = bench.preset["reps"]["load"]
        bench.alternate({"ours": ours, "plain": theirs}, reps)  # the times of from_pretrained alone are in .times
        times = {"ours": ours.times[-reps:], "plain": theirs.times[-reps:]}
        what = (
            f"from_pretrained ({'bf16 to ' + str(bench.device) if on_gpu else 'float32'}): OmniLMM / Mistral same bytes"
            if kind == "materialised"
            else "from_pretrained call, bf16 mmap'd (not read): OmniLMM / Mistral"
        )
        bench.add(
            "6 loading",
            what,
            paired_ratio(times["ours"], times["plain"]),
            "<= 1.20",
            f"OmniLMM {fmt_s(median(times['ours']))}, Mistral {fmt_s(median(times['plain']))} ({sizes_note})",
        )
