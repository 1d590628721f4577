"""Comparison 6 of `omnilmm-bench`: conversion and loading."""

import gc
import json
import os
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


def write_llava_next(folder: Path, sizes: dict, target_bytes: int) -> int:
    """The peer VLM: a LlavaNextForConditionalGeneration folder (bf16 safetensors, 2 GB shards) from a random config,
    a CLIP vision tower of the EVA's width, depth and MLP and a Mistral decoder of `sizes`, with a vocabulary sized so
    that the weights take `target_bytes`, like the converted OmniLMM folder."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    eva, hidden = sizes["vision"], sizes["hidden_size"]
    width = eva.get("embed_dim", 1792)
    vision = CLIPVisionConfig(
        hidden_size=width, num_attention_heads=eva.get("num_heads", 16), image_size=448, patch_size=14,
        intermediate_size=round(width * eva.get("mlp_ratio", 15360 / 1792)),
        num_hidden_layers=eva.get("depth", 64) - 1,  # the converted folder keeps all blocks but the last
    )
    text = MistralConfig(
        hidden_size=hidden, intermediate_size=sizes["intermediate_size"],
        num_attention_heads=sizes["num_attention_heads"], num_key_value_heads=sizes["num_key_value_heads"],
        num_hidden_layers=sizes["num_hidden_layers"], vocab_size=VOCAB_SIZE, tie_word_embeddings=False,
    )

    def build():
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=VOCAB_SIZE - 1)
        with torch.device("meta"):
            return LlavaNextForConditionalGeneration(config)

    base = sum(p.numel() for p in build().parameters()) * 2
    text.vocab_size = VOCAB_SIZE + max(0, round((target_bytes - base) / (2 * 2 * hidden)))
    model = build().to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        fill_random_([p.data for p in model.parameters()], seed=1)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    gc.collect()
    return folder_bytes(folder)


def bench_convert_and_load(bench: Bench, workdir: Path):
    from transformers import AutoModelForCausalLM, LlavaNextForConditionalGeneration

    sizes = bench.preset["checkpoint"]
    header("6. Conversion (peak RSS of omnilmm-convert) and from_pretrained time")
    src, dst, peer = workdir / "original", workdir / "converted", workdir / "llava_next"
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
    (src / "pytorch_model.bin").unlink()  # free the disk before writing the peer's folder
    converted_bytes = folder_bytes(dst)
    peer_bytes = write_llava_next(peer, sizes, converted_bytes)
    os.sync()  # the folders just written go to disk now, not during the timed loads
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
        f"OmniLMM {converted_bytes / 1e9:.2f} GB, LLaVA-NeXT {peer_bytes / 1e9:.2f} GB on disk (bf16), page cache warm"
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
        theirs = timed(lambda: LlavaNextForConditionalGeneration.from_pretrained(peer, **kwargs))
        reps = bench.preset["reps"]["load"]
        bench.alternate({"ours": ours, "peer": theirs}, reps)  # the times of from_pretrained alone are in .times
        times = {"ours": ours.times[-reps:], "peer": theirs.times[-reps:]}
        precision = f"bf16 to {bench.device}" if on_gpu else "float32"
        what = (
            f"from_pretrained ({precision}): OmniLMM / LLaVA-NeXT same bytes"
            if kind == "materialised"
            else "from_pretrained call, bf16 mmap'd (not read): OmniLMM / LLaVA-NeXT"
        )
        # On a CPU both loads are the same transformers code faulting in the same bytes of fresh memory, and a round
        # takes 1.0-4.7 s here by how the kernel finds free pages: the medians of 9 rounds, not per-round ratios.
        spread = {name: f"{fmt_s(min(t))}-{fmt_s(max(t))}" for name, t in times.items()}
        bench.add(
            "6 loading",
            what,
            median(times["ours"]) / median(times["peer"]),
            "<= 1.20",
            f"median of {reps}: OmniLMM {fmt_s(median(times['ours']))} ({spread['ours']}), LLaVA-NeXT "
            f"{fmt_s(median(times['peer']))} ({spread['peer']}; {sizes_note})",
        )
