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
   `from_pretrained` of the converted folder against a plain Mistral folder of the same size;
7. serving (needs vLLM: `.venv-vllm`): 32 image+text prompts through vLLM's offline engine against one batched
   `generate`, same folder, same greedy tokens.
8. weight-only quantization (optimum-quanto): resident memory and decode speed of int8 and int4 against bf16, the
   greedy tokens' agreement and the logit drift;
9. video (`omnilmm_tools.bench_video`, needs PyAV): decoding and sampling a 3-minute 720p clip to 64 frames against
   decoding every frame (and MiniCPM-V's decord recipe, vLLM's OpenCV loader, where installed), and the tokens and
   vision encoding time a second of video costs;
10. the web demo (`omnilmm_tools.bench_demo`, needs Gradio, Playwright and chromium): an answer through the page in
   headless Chromium against `chat()` called directly.

The model is random (no download), at the sizes of `--preset` (see `PRESETS`; `--smoke` = tiny, seconds).
"""

import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cli import Parser, positive_int, torch_device
from .cpu_decoding import block_lm_head
from .remote import remote_module

# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------

# `model`: the random model the timed comparisons 2-5 run; `checkpoint`: the original-format checkpoint that
# comparison 6 converts and loads (it is never run, so it can have the real widths and enough layers to pass 2 GB).
REAL_EVA = {}  # eva02_enormous: width 1792, 16 heads, MLP 15360 (timm's defaults for the name)
PRESETS = {
    # Seconds: for tests. Sizes mean nothing here.
    "smoke": {
        "model": dict(
            vision=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
            hidden_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
        ),
        "checkpoint": dict(
            vision=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
            hidden_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
        ),
        "quantize": dict(
            vision=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
            hidden_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
        ),
        "photos": [(320, 240), (800, 600)],
        "tile_image": (640, 480),
        "reps": dict(preprocess=1, vision=1, overhead=1, multiturn=1, batched=1, load=1, serving=1, quantize=1,
                     video=1, demo=1),
        "new_tokens": dict(overhead=2, multiturn=2, batched=2, serving=2, quantize=2, demo=4),
    },
    # CPU (2 cores): the real Mistral head dim (128) and EVA patch/grid, at half the real widths and one layer,
    # so that the whole run fits in 15 minutes; the converted checkpoint has the real widths.
    "cpu": {
        "model": dict(
            vision=dict(embed_dim=1024, depth=2, num_heads=16, mlp_ratio=4.0),  # 1 EVA block (+ the dropped last one)
            hidden_size=2048, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=4,
            intermediate_size=7168,
        ),
        "checkpoint": dict(
            vision=dict(REAL_EVA, depth=3),  # 2 real EVA-Enormous blocks (width 1792)
            hidden_size=4096, num_hidden_layers=3, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336,
        ),
        # decoder-heavy like the 12B (its embedding and LM head are 2% of it): 24 layers at half the real width
        "quantize": dict(
            vision=dict(embed_dim=1024, depth=3, num_heads=16, mlp_ratio=4.0),
            hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
            intermediate_size=7168,
        ),
        "photos": [(1600, 1200), (4000, 3000)],
        "tile_image": (1600, 1200),
        "reps": dict(preprocess=5, vision=4, overhead=7, multiturn=6, batched=2, load=5, serving=2, quantize=1,
                     video=2, demo=3),
        "new_tokens": dict(overhead=24, multiturn=8, batched=32, serving=32, quantize=16, demo=64),
    },
    # GPU: the real widths (EVA 1792, Mistral 4096) with a few layers.
    "gpu": {
        "model": dict(
            vision=dict(REAL_EVA, depth=5),
            hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336,
        ),
        "checkpoint": dict(
            vision=dict(REAL_EVA, depth=5),
            hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336,
        ),
        "quantize": dict(
            vision=dict(REAL_EVA, depth=5),
            hidden_size=4096, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336,
        ),
        "photos": [(1600, 1200), (4000, 3000)],
        "tile_image": (1600, 1200),
        "reps": dict(preprocess=5, vision=5, overhead=5, multiturn=5, batched=3, load=3, serving=3, quantize=3,
                     video=2, demo=3),
        "new_tokens": dict(overhead=64, multiturn=32, batched=64, serving=64, quantize=32, demo=128),
    },
}
NUM_QUERY = 64  # MiniCPM-V-style slicing models: 64 tokens per tile
VOCAB_SIZE = 32009  # Mistral v0.1 + the 9 OmniLMM tokens
BATCH = 8
MIN_CHECKPOINT_BYTES = 2 * 10**9

# ---------------------------------------------------------------------------------------------------------------
# Timing and reporting
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    comparison: str
    what: str
    value: float
    target: str  # e.g. ">= 1.50" or "<= 1.05"; "info": printed against its limit, no target on this device
    details: str = ""
    smoke: bool = False

    @property
    def passed(self) -> bool | None:
        if self.target == "info":
            return None
        op, bound = self.target.split()
        bound = float(bound)
        return {"<=": self.value <= bound, ">=": self.value >= bound, ">": self.value > bound, "<": self.value < bound}[op]

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "INFO"}[self.passed]

    def line(self) -> str:
        verdict = self.verdict
        if self.smoke:
            verdict += " (smoke sizes: not meaningful)"
        return f"  {self.what:<62} ratio {self.value:7.3f}   target {self.target:<7}  {verdict}"


@dataclass
class Bench:
    device: torch.device
    preset: dict
    smoke: bool
    rows: list = field(default_factory=list)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn):
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result

    def alternate(self, contenders: dict, reps: int, warmup: int = 1) -> dict:
        """Run the `contenders` (name -> zero-argument function) in turn, `warmup` untimed rounds then `reps`
        timed rounds, rotating who goes first each round. Returns name -> list of seconds (one per round)."""
        names = list(contenders)
        for _ in range(0 if self.smoke else warmup):
            for name in names:
                contenders[name]()
        times = {name: [] for name in names}
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                times[name].append(self.timed(contenders[name])[0])
        return times

    def add(self, comparison, what, value, target, details=""):
        row = Row(comparison, what, value, target, details, self.smoke)
        self.rows.append(row)
        print(row.line(), flush=True)
        if details:
            print(f"      {details}", flush=True)
        return row


def median(values):
    return statistics.median(values)


def paired_ratio(numerators, denominators):
    """Median of the per-round ratios: robust to the machine getting slower or faster during the run."""
    return median([a / b for a, b in zip(numerators, denominators)])


def fmt_s(seconds):
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def header(title):
    print(f"\n== {title}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and models
# ---------------------------------------------------------------------------------------------------------------


def synthetic_photo(width, height, seed=0):
    """A textured RGB 'photo': smooth colour waves, edges and per-pixel noise (flat colours would flatter
    every resampler and compressor)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    channels = []
    for c in range(3):
        wave = np.sin(2 * np.pi * (3 + c) * x + c) * np.cos(2 * np.pi * (2 + c) * y - c)
        bands = ((x * (7 + c) + y * (5 - c)) % 1.0 > 0.5).astype(np.float32)
        channels.append(128 + 70 * wave + 30 * bands)
    base = np.stack(channels, axis=-1)
    noise = rng.normal(0, 20, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def image_questions(processor, count):
    """`count` chat prompts of one image and a question each, and their images (synthetic photos, each its own size),
    as comparisons 7 and 8 ask them."""
    images = [synthetic_photo(320 + 16 * i, 240 + 8 * i, seed=i) for i in range(count)]
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {i}: what is "
                                                                                   "in this picture?"}]}]
             for i in range(count)]
    return [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats], images


def omnilmm_config(sizes: dict, **extra):
    vision = dict(sizes["vision"])
    config_cls = remote_module("configuration_omnilmm").OmniLMMConfig
    return config_cls(
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        intermediate_size=sizes["intermediate_size"],
        vocab_size=VOCAB_SIZE,
        num_query=NUM_QUERY,
        vision_tower_kwargs=vision,
        pad_token_id=0,
        use_cache=True,
        **extra,
    )


def fill_random_(tensors, seed=0, pool_elements=1 << 24):
    """Fill tensors with N(0, 0.02) values quickly: one random pool, copied at varying offsets."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_elements, generator=generator) * 0.02
    offset = 0
    for tensor in tensors:
        flat = tensor.view(-1)
        done = 0
        while done < flat.numel():
            start = offset % (pool_elements // 2)
            take = min(flat.numel() - done, pool_elements - start)
            flat[done : done + take].copy_(pool[start : start + take])
            done += take
            offset += 7919 * 13 + take
    return tensors


def random_model(config, device, dtype):
    """A random OmniLMMForCausalLM, built on meta and filled quickly: matrices N(0, 0.02), norms at 1, biases and
    buffers (EVA's k_bias) at 0, the resampler's sin-cos table as in the release, rope frequencies recomputed."""
    modeling = remote_module("modeling_omnilmm")
    resampler_module = remote_module("resampler")
    with torch.device("meta"):
        model = modeling.OmniLMMForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        matrices = []
        for name, param in model.named_parameters():
            if name.endswith("resampler.pos_embed"):
                table = resampler_module.get_2d_sincos_pos_embed(param.shape[1], math.isqrt(param.shape[0]))
                param.copy_(table)
            elif param.ndim == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                matrices.append(param.data)
        fill_random_(matrices)
        for buffer in model.buffers():
            buffer.zero_()
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # inv_freq in fp32, as from_pretrained
    model = model.to(device).eval()
    model.generation_config.pad_token_id = 0
    return model


def mistral_twin(model):
    """A plain MistralForCausalLM sharing `model`'s decoder weights (no copy)."""
    from transformers import MistralConfig, MistralForCausalLM

    fields = MistralConfig().to_dict()
    source = model.config.to_dict()
    config = MistralConfig(**{k: source[k] for k in fields if k in source and k not in ("architectures", "auto_map")})
    config.model_type = "mistral"
    with torch.device("meta"):
        twin = MistralForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if ".vision_tower." not in k and ".resampler." not in k}
    twin.load_state_dict(state, assign=True, strict=True)
    twin.model.rotary_emb = model.model.rotary_emb
    twin.generation_config.pad_token_id = 0
    return twin.eval()


def build_processor(slice_mode=True):
    from .tokenizer import build_tokenizer

    image_processing = remote_module("image_processing_omnilmm")
    processing = remote_module("processing_omnilmm")
    return processing.OmniLMMProcessor(
        image_processor=image_processing.OmniLMMImageProcessor(slice_mode=slice_mode),
        tokenizer=build_tokenizer(),
        num_query=NUM_QUERY,
    )


def gemm_ceiling(bench: Bench, weight: torch.Tensor, rows: int, batch: int, reps: int = 5,
                 linear=torch.nn.functional.linear) -> tuple[float, float, float]:
    """The limit batching can reach on this machine for a layer: `batch` x the time of `linear(x, weight)` on `rows`
    rows of input, over its time on `batch * rows` rows (1.0 = no gain: the small GEMM already runs at peak). Returns
    (ceiling, seconds for one, seconds for the batch)."""
    one = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
    many = torch.randn(rows * batch, weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.inference_mode():
        times = bench.alternate({"one": lambda: linear(one, weight), "many": lambda: linear(many, weight)}, reps)
    return batch * paired_ratio(times["one"], times["many"]), median(times["one"]), median(times["many"])


def decoding_ceiling(bench: Bench, model, batch: int, reps: int = 15) -> tuple[float, float, float]:
    """The limit batching can reach for decoding on this machine: `batch` x the time of a decoding step's matrix
    products (each of the decoder's linear layers and the LM head, as the model runs them) on one row, over their
    time on `batch` rows. Returns (ceiling, seconds for one row, seconds for the batch)."""
    layers = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    inputs = {rows: [torch.randn(rows, m.in_features, device=bench.device, dtype=model.dtype) for m in layers]
              for rows in (1, batch)}

    def step(rows):
        for layer, x in zip(layers, inputs[rows]):
            layer(x)

    with torch.inference_mode():
        times = bench.alternate({"one": lambda: step(1), "many": lambda: step(batch)}, reps)
    return batch * paired_ratio(times["one"], times["many"]), median(times["one"]), median(times["many"])


# ---------------------------------------------------------------------------------------------------------------
# 1. Image preprocessing
# ---------------------------------------------------------------------------------------------------------------


def bench_preprocessing(bench: Bench):
    from transformers import LlavaNextImageProcessor, LlavaNextImageProcessorPil

    header("1. Image preprocessing, slice mode, up to 9 tiles + overview (images/second, one image per call)")
    image_processing = remote_module("image_processing_omnilmm")
    # Ours per backend: the PIL class (bit-exact to the original, what saved folders load) and the torchvision one.
    ours = {
        "ours (PIL)": image_processing.OmniLMMImageProcessor(slice_mode=True, max_slice_nums=9),
        "ours (torchvision)": image_processing.OmniLMMImageProcessorFast(slice_mode=True, max_slice_nums=9),
    }
    # LLaVA-NeXT with 336-px tiles and every grid of up to 9 tiles (LLaVA-OneVision's "anyres_max_9" idea):
    # the same job, up to 9 tiles + an overview per image.
    pinpoints = [[336 * c, 336 * r] for c in range(1, 10) for r in range(1, 10) if c * r <= 9]
    llava_kwargs = dict(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    peers = {
        "LLaVA-NeXT (PIL)": LlavaNextImageProcessorPil(**llava_kwargs),
        "LLaVA-NeXT (torchvision)": LlavaNextImageProcessor(**llava_kwargs),
    }
    pairs = {"LLaVA-NeXT (PIL)": "ours (PIL)", "LLaVA-NeXT (torchvision)": "ours (torchvision)"}  # same backend
    reps = bench.preset["reps"]["preprocess"]
    for width, height in bench.preset["photos"]:
        photo = synthetic_photo(width, height)
        contenders = {name: (lambda processor=processor: processor(photo)) for name, processor in ours.items()}
        for name, processor in peers.items():
            contenders[name] = lambda processor=processor: processor(photo, return_tensors="pt")
        shapes = {
            **{name: len(p(photo)["pixel_values"][0]) for name, p in ours.items()},
            **{name: tuple(p(photo, return_tensors="pt")["pixel_values"].shape[1:2]) for name, p in peers.items()},
        }
        times = bench.alternate(contenders, reps)
        rate = {name: 1 / median(t) for name, t in times.items()}
        print(
            f"  {width}x{height} ({width * height / 1e6:.1f} MP): "
            + ", ".join(f"{name} {rate[name]:.2f} img/s" for name in times)
            + f"  [tiles per image: ours {shapes['ours (PIL)']}, LLaVA-NeXT {shapes['LLaVA-NeXT (PIL)'][0]}]",
            flush=True,
        )
        for name, mine in pairs.items():
            bench.add(
                "1 preprocessing",
                f"{width}x{height}: {mine} / {name} (images/s)",
                paired_ratio(times[name], times[mine]),
                "> 1.00",
                f"{mine} {fmt_s(median(times[mine]))}/image, {name} {fmt_s(median(times[name]))}/image",
            )


# ---------------------------------------------------------------------------------------------------------------
# 2. Vision encoding
# ---------------------------------------------------------------------------------------------------------------


def tile_pixels(bench: Bench):
    processor = remote_module("image_processing_omnilmm").OmniLMMImageProcessor(slice_mode=True)
    out = processor(synthetic_photo(*bench.preset["tile_image"]))
    return out["pixel_values"][0], out["slice_grids"][0][0]


def bench_vision(bench: Bench, model):
    header("2. Vision encoding of a sliced image (overview + 9 tiles): batched vs one tile at a time")
    images, grid = tile_pixels(bench)
    images = [image.to(bench.device) for image in images]
    print(f"  {len(images)} images: overview {tuple(images[0].shape[1:])}, grid {grid}, tiles {tuple(images[1].shape[1:])}")

    def batched():
        with torch.inference_mode():
            return model.get_vision_embedding([images])

    def one_by_one():
        with torch.inference_mode():
            return torch.cat([model.get_vision_embedding(image[None]) for image in images])

    difference = float((batched().float() - one_by_one().float()).abs().max())  # also the warm-up of both
    times = bench.alternate({"batched": batched, "one at a time": one_by_one}, bench.preset["reps"]["vision"], warmup=0)
    fc1 = model.model.vision_tower.blocks[0].mlp.fc1.weight
    tokens = (images[1].shape[1] // 14) * (images[1].shape[2] // 14) + 1
    ceiling, t_one, t_many = gemm_ceiling(bench, fc1, tokens, len(images) - 1)
    bench.add(
        "2 vision",
        "batched get_vision_embedding speed-up over one tile at a time",
        paired_ratio(times["one at a time"], times["batched"]),
        # a CPU is busy with one ~1,000-token tile already: there the row is measured against its GEMM limit
        ">= 3.00" if bench.device.type == "cuda" else "info",
        f"batched {fmt_s(median(times['batched']))}, one at a time {fmt_s(median(times['one at a time']))} "
        f"({len(images)} images, largest difference {difference:.1e}). Limit here: the EVA MLP GEMM on {len(images) - 1} tiles at once is "
        f"{ceiling:.2f}x faster than tile by tile ({fmt_s(t_many)} vs {len(images) - 1} x {fmt_s(t_one)})",
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. Generation overhead
# ---------------------------------------------------------------------------------------------------------------


def image_prompt_ids(processor, text, grid=None):
    """Token ids of a one-image prompt (`<image>` expanded for `grid`), as a `(1, L)` tensor."""
    placeholder = processor.image_placeholder(grid)
    return processor.tokenizer(text.replace("<image>", placeholder), return_tensors="pt")["input_ids"]


def bench_generation_overhead(bench: Bench, model, twin, processor):
    header("3. Generation overhead: OmniLMM generate (image features precomputed) vs MistralForCausalLM.generate")
    new_tokens = bench.preset["new_tokens"]["overhead"]
    ids = image_prompt_ids(processor, "<image>\nDescribe this picture in detail, with its colours and shapes.")
    ids = ids.to(bench.device)
    dtype = model.dtype
    features = torch.randn(1, NUM_QUERY, model.config.hidden_size, device=bench.device, dtype=dtype)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(model.model.get_placeholder_mask(ids, embeds, features), features)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def ours():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, vision_hidden_states=features, **settings)

    def plain():
        with torch.inference_mode():
            return twin.generate(inputs_embeds=embeds, attention_mask=mask, **settings)

    first, second = ours()[0, ids.shape[1] :], plain()[0, -new_tokens:]
    same = torch.equal(first.cpu(), second.cpu())
    times = bench.alternate({"ours": ours, "plain": plain}, bench.preset["reps"]["overhead"])
    bench.add(
        "3 generation overhead",
        f"OmniLMM.generate / Mistral.generate ({ids.shape[1]}-token prompt, {new_tokens} new)",
        paired_ratio(times["ours"], times["plain"]),
        "<= 1.05",
        f"ours {fmt_s(median(times['ours']))}, Mistral {fmt_s(median(times['plain']))}; same tokens: {same}",
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. Multi-turn
# ---------------------------------------------------------------------------------------------------------------


def bench_multiturn(bench: Bench, model, processor):
    header("4. Multi-turn: second chat() turn about the same image (features reused) vs a text-only turn")
    new_tokens = bench.preset["new_tokens"]["multiturn"]
    photo = synthetic_photo(*bench.preset["tile_image"], seed=1)
    question, answer, follow_up = "What is in this picture?", "A pattern of coloured waves and stripes.", "Which colour dominates?"
    image_turn = [
        {"role": "user", "content": [photo, question]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": follow_up},
    ]
    settings = dict(processor=processor, sampling=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def prompt_length(msgs, with_image):
        modeling = remote_module("modeling_omnilmm")
        conversation, visuals = modeling.chat_conversation(msgs)
        images = [image for _, image in visuals]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return processor(text=[text], images=[images] if with_image else None)["input_ids"].shape[1]

    target = prompt_length(image_turn, True)
    filler_words = target  # grow or shrink a filler text until the text-only prompt has the same length
    for _ in range(20):
        filler = " ".join(["word"] * max(filler_words, 0))
        text_turn = [
            {"role": "user", "content": f"{filler}\n{question}"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": follow_up},
        ]
        length = prompt_length(text_turn, False)
        if length == target:
            break
        filler_words += target - length
    model.clear_chat_cache()
    with torch.inference_mode():
        model.chat(msgs=image_turn[:1], **settings)  # first turn: encodes the image (untimed)

    def second_turn():
        return model.chat(msgs=image_turn, **settings)

    def text_only():
        return model.chat(msgs=text_turn, **settings)

    times = bench.alternate({"image turn": second_turn, "text turn": text_only}, bench.preset["reps"]["multiturn"])
    bench.add(
        "4 multi-turn",
        f"2nd turn with cached image / text-only turn ({target} tokens, {new_tokens} new)",
        paired_ratio(times["image turn"], times["text turn"]),
        "<= 1.05",
        f"image turn {fmt_s(median(times['image turn']))}, text-only {fmt_s(median(times['text turn']))}"
        + ("" if length == target else f" (text-only prompt {length} tokens)"),
    )
    model.clear_chat_cache()


# ---------------------------------------------------------------------------------------------------------------
# 5. Batched generation
# ---------------------------------------------------------------------------------------------------------------


def bench_batched(bench: Bench, model, processor):
    header(f"5. Batched generation: one batch of {BATCH} prompts vs {BATCH} calls of one")
    block_lm_head(model)  # the project's best CPU decoding path (omnilmm_tools.cpu_decoding)
    new_tokens = bench.preset["new_tokens"]["batched"]
    questions = [
        "What is this?", "Describe the image.", "What colours do you see?", "Is there any text in the picture?",
        "Count the stripes, please.", "Where could this photo have been taken?", "Write a caption.",
        "What is unusual about this image, if anything?",
    ]
    generator = torch.Generator().manual_seed(0)
    samples = []
    for question in questions[:BATCH]:
        ids = image_prompt_ids(processor, f"<image>\n{question}")[0].tolist()
        features = torch.randn(1, NUM_QUERY, model.config.hidden_size, generator=generator).to(bench.device, model.dtype)
        samples.append((ids, features))
    width = max(len(ids) for ids, _ in samples)
    batch_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in samples], device=bench.device)
    batch_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in samples], device=bench.device)
    batch_features = torch.cat([features for _, features in samples])
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def batched():
        with torch.inference_mode():
            return model.generate(batch_ids, attention_mask=batch_mask, vision_hidden_states=batch_features, **settings)

    def one_by_one():
        with torch.inference_mode():
            for ids, features in samples:
                ids = torch.tensor([ids], device=bench.device)
                model.generate(ids, attention_mask=torch.ones_like(ids), vision_hidden_states=features, **settings)

    with torch.inference_mode():  # warm-up, short
        model.generate(batch_ids, attention_mask=batch_mask, vision_hidden_states=batch_features, **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})
    times = bench.alternate({"batched": batched, "one by one": one_by_one}, bench.preset["reps"]["batched"], warmup=0)
    tokens = BATCH * new_tokens
    ceiling, t_one, t_many = decoding_ceiling(bench, model, BATCH)
    gain = paired_ratio(times["one by one"], times["batched"])
    bench.add(
        "5 batched generation",
        f"throughput batch of {BATCH} / {BATCH} calls of one, over its limit here",
        gain / ceiling,
        ">= 0.85",
        f"{gain:.2f}x ({width}-token prompts, {new_tokens} new): batch {tokens / median(times['batched']):.1f} tok/s "
        f"({fmt_s(median(times['batched']))}), one by one {tokens / median(times['one by one']):.1f} tok/s "
        f"({fmt_s(median(times['one by one']))}). The limit, measured: a decoding step's matrix products (every "
        f"linear layer and the LM head, as the model runs them) take {fmt_s(t_many)} for {BATCH} rows against "
        f"{fmt_s(t_one)} for 1, so batching can speed them up by at most {ceiling:.2f}x on this machine",
    )


# ---------------------------------------------------------------------------------------------------------------
# 7. Serving: vLLM against batched generate
# ---------------------------------------------------------------------------------------------------------------

SERVING_PROMPTS = 32


def bench_serving(bench: Bench, workdir: Path):
    """vLLM's offline engine (the `omnilmm` plugin) and the project's best `transformers` path (one batched
    `generate` with the blocked CPU LM head) answer the same image questions greedily, from the same folder, each
    on every core and with no cache across repetitions. Each also runs with one new token (images + prefill), which
    splits the time into the vision encoding and prefill (the same remote code on both sides) and the decoding.
    The contenders run one after the other, not alternating: vLLM's engine process keeps spinning while idle."""
    if bench.device.type == "cpu":  # vLLM's CPU worker keeps a core for the frontend unless told otherwise
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        from vllm import LLM
    except ImportError:
        raise SystemExit("comparison 7 (serving) needs vLLM: run it in .venv-vllm (see the README)") from None
    from transformers import AutoModelForCausalLM, AutoProcessor

    from .finetune import save_hub_folder

    new_tokens, reps = bench.preset["new_tokens"]["serving"], bench.preset["reps"]["serving"]
    header(f"7. Serving: {SERVING_PROMPTS} image+text prompts, vLLM's offline engine vs one batched generate")
    folder = workdir / "serving"
    model = random_model(omnilmm_config(bench.preset["model"]), torch.device("cpu"), torch.float32)
    save_hub_folder(model, build_processor(slice_mode=False), folder)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompts, images = image_questions(processor, SERVING_PROMPTS)

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    model = model.to(bench.device).eval()
    inputs = processor(text=prompts, images=[[image] for image in images], return_tensors="pt").to(bench.device)

    def transformers_batch(n=new_tokens):
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return output[:, inputs["input_ids"].shape[1] :].tolist()

    hf_tokens = transformers_batch()  # the reference: the plain LM head (the blocked one sums in another order)
    if bench.device.type == "cpu":
        block_lm_head(model)
    hf = bench.alternate({"all": transformers_batch, "first": lambda: transformers_batch(1)}, reps)
    del model
    gc.collect()

    started = time.perf_counter()
    llm = LLM(str(folder), trust_remote_code=True, dtype="float32", gpu_memory_utilization=0.15, seed=0,
              max_model_len=2048, enable_prefix_caching=False, mm_processor_cache_gb=0)
    engine_start = time.perf_counter() - started
    requests = [{"prompt": p, "multi_modal_data": {"image": image}} for p, image in zip(prompts, images)]

    def vllm_engine(n=new_tokens):
        params = llm.get_default_sampling_params()
        params.temperature, params.max_tokens, params.min_tokens = 0.0, n, n
        return [list(out.outputs[0].token_ids) for out in llm.generate(requests, params, use_tqdm=False)]

    # vLLM's own bound: the images and prefill as measured, then decoding as fast as vLLM decodes text prompts of
    # the same lengths (the image placeholders made plain tokens): what the plugin could reach at best
    patch, plain = processor.im_patch_token_id, processor.tokenizer.convert_tokens_to_ids("▁a")
    texts = [{"prompt_token_ids": [plain if t == patch else t for t in ids]} for ids in inputs["input_ids"].tolist()]

    def vllm_text(n=new_tokens):
        params = llm.get_default_sampling_params()
        params.temperature, params.max_tokens, params.min_tokens = 0.0, n, n
        llm.generate(texts, params, use_tqdm=False)

    vllm = bench.alternate({"all": vllm_engine, "first": lambda: vllm_engine(1), "text": vllm_text,
                            "text first": lambda: vllm_text(1)}, reps)
    same = sum(a == b for a, b in zip(vllm_engine(), hf_tokens))
    llm.llm_engine.engine_core.shutdown()
    tokens = SERVING_PROMPTS * new_tokens
    t_hf, t_vllm = median(hf["all"]), median(vllm["all"])
    # the decoding time is a difference of two timings: at smoke sizes noise can make it negative, so clamp it
    decode_hf, decode_vllm = max(0.0, t_hf - median(hf["first"])), max(0.0, t_vllm - median(vllm["first"]))
    decode_ratio = f"{decode_hf / decode_vllm:.2f}x" if decode_hf > 0 and decode_vllm > 0 else "too short to compare"
    decode_text = max(0.0, median(vllm["text"]) - median(vllm["text first"]))
    bound = median(vllm["first"]) + decode_text
    bench.add(
        "7 serving",
        f"throughput vLLM / batched generate ({SERVING_PROMPTS} image prompts, {new_tokens} new tokens)",
        paired_ratio(hf["all"], vllm["all"]),
        ">= 2.00" if bench.device.type == "cuda" else "info",
        f"vLLM {tokens / t_vllm:.1f} tok/s ({fmt_s(t_vllm)}; engine start {engine_start:.0f} s, not counted), "
        f"batched generate {tokens / t_hf:.1f} tok/s ({fmt_s(t_hf)}); same greedy tokens for {same} of "
        f"{SERVING_PROMPTS} prompts. Bound: images + prefill to the first token (the same vision code on both sides) "
        f"take {fmt_s(median(vllm['first']))} in vLLM and {fmt_s(median(hf['first']))} in generate; the "
        f"{new_tokens - 1} decoding steps after it take {fmt_s(decode_vllm)} and {fmt_s(decode_hf)} "
        f"({decode_ratio}), so with free decoding vLLM could be at most "
        f"{t_hf / median(vllm['first']):.2f}x faster here (a target on a GPU; on a CPU the vision tower bounds it)",
    )
    bench.add(
        "7 serving",
        "throughput vLLM / its own bound (images + vLLM's text decoding)",
        bound / t_vllm if t_vllm > 0 else 0.0,
        ">= 0.90",
        f"the bound: vLLM's images + prefill ({fmt_s(median(vllm['first']))}) and then {new_tokens - 1} steps as fast "
        f"as vLLM decodes {SERVING_PROMPTS} text prompts of the same lengths ({fmt_s(decode_text)}): "
        f"{fmt_s(bound)} against {fmt_s(t_vllm)} measured",
    )


# ---------------------------------------------------------------------------------------------------------------
# 8. Weight-only quantization
# ---------------------------------------------------------------------------------------------------------------

CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX"}


def cpu_features() -> str:
    """The CPU's model and the features that decide which precision is fastest on it (bf16 is emulated, and
    slower than fp32, without AVX-512 BF16 or AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(fields.get("flags\t\t", fields.get("flags", "")).split())
    name = fields.get("model name\t", platform.processor() or "?").strip()
    present = ", ".join(f"{label} {'yes' if flag in flags else 'no'}" for flag, label in CPU_FEATURES.items())
    return f"{name} ({present}; torch dispatches {torch.backends.cpu.get_cpu_capability()})"


def vm_status(key: str) -> int:
    """`VmRSS`, `VmHWM` ... of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensor) -> int:
    """The bytes a tensor holds; for quanto's quantized tensors, those of their inner tensors (data, scales, ...)."""
    if hasattr(tensor, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


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

    def answer(n, clock=None):
        with torch.no_grad():  # (quanto's int4 weights fail under inference_mode: "Cannot set version_counter")
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([clock] if clock else []))

    answer(1)  # the warm-up
    questions, steps = [], []
    for _ in range(reps):
        output = answer(new_tokens, clock := StepClock())
        questions.append(clock.steps[-1] - clock.started)
        steps.append((clock.steps[-1] - clock.steps[0]) / max(1, new_tokens - 1))
    torch.save({"weights": weights, "peak": peak, "question_s": median(questions), "decode_s": median(steps),
                "tokens": output.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
                "logits": output.logits[0].float(), "computes": str(computes).removeprefix("torch.")}, out)


def run_quantize_command(src: Path, dst: Path, weights: str) -> tuple[float, int]:
    """`omnilmm-quantize src dst --weights ...` in its own process: its time and its peak resident memory."""
    code = ("import sys; from omnilmm_tools.quantize import main; from omnilmm_tools.bench import vm_status; "
            "main(sys.argv[1:]); print('VmHWM', vm_status('VmHWM'))")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(src), str(dst), "--weights", weights],
                            capture_output=True, text=True, cwd=str(Path(__file__).parent.parent))
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
    from .finetune import save_hub_folder

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
        code = "import sys; from omnilmm_tools.bench import quantized_run; quantized_run(*sys.argv[1:])"
        result = subprocess.run([sys.executable, "-c", code, str(path), precision, str(new_tokens), str(reps),
                                 str(out)], capture_output=True, text=True, cwd=str(Path(__file__).parent.parent))
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


# ---------------------------------------------------------------------------------------------------------------
# 6. Conversion and loading
# ---------------------------------------------------------------------------------------------------------------

ADDED_TOKENS = ["<im_patch>", "<im_start>", "<im_end>", "<box>", "</box>", "<ref>", "</ref>", "<quad>", "</quad>"]


def write_original_checkpoint(folder: Path, sizes: dict) -> tuple[int, object]:
    """An original-format OmniLMM folder (`config.json`, bf16 `pytorch_model.bin`, `added_tokens.json`)."""
    from .convert import expected_state_dict_shapes

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
    from .convert import main as convert_main

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


def run_sampled(command: list[str], cwd: str) -> tuple[dict, float, int, str]:
    """Run `command`, sampling its /proc status every 10 ms. Returns the peaks (`VmHWM`: the kernel's high-water
    mark of its resident set; `RssAnon`, `RssFile`: sampled maxima), the wall time, the exit code and the output.

    Not `ru_maxrss` from wait4/getrusage: the child starts as a (v)fork of this process, and exec() folds this
    process's own high-water mark into the child's ru_maxrss. VmHWM belongs to the child's fresh address space."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(process.stdout), daemon=True)
    reader.start()
    status_file, cmdline_file = Path(f"/proc/{process.pid}/status"), Path(f"/proc/{process.pid}/cmdline")
    own_cmdline = "\0".join(command).encode()
    while True:
        try:
            # until exec() the child is a copy of this process (its status shows our memory): skip that
            if cmdline_file.read_bytes().rstrip(b"\0") == own_cmdline:
                for line in status_file.read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        if process.poll() is not None:
            break
        time.sleep(0.01)
    reader.join(timeout=10)
    return peaks, time.perf_counter() - started, process.returncode, b"".join(chunks).decode(errors="replace")


def run_converter(src: Path, dst: Path):
    """Run the converter (what the `omnilmm-convert` console script runs, from this benchmark's own checkout) as a
    child process; return its peak RSS, wall time and sampled peaks."""
    command = [sys.executable, "-m", "omnilmm_tools.convert", str(Path(src).resolve()), str(Path(dst).resolve())]
    peaks, seconds, returncode, output = run_sampled(command, str(Path(__file__).resolve().parent.parent))
    if returncode:
        raise RuntimeError(f"omnilmm-convert failed ({returncode}):\n{output[-3000:]}")
    return peaks["VmHWM"], seconds, peaks


def folder_bytes(folder: Path, pattern="*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


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


def import_baseline_rss() -> int:
    """Peak RSS of a Python that only imports the converter (torch, transformers, timm): the floor of any
    conversion's peak."""
    command = [sys.executable, "-c", "import omnilmm_tools.convert, omnilmm_tools.tokenizer"]
    return run_sampled(command, str(Path(__file__).resolve().parent.parent))[0]["VmHWM"]


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def machine_line(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    line = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line


def describe(sizes):
    vision = sizes["vision"]
    return (
        f"EVA width {vision.get('embed_dim', 1792)}, {vision.get('depth', 64) - 1} block(s), "
        f"MLP x{vision.get('mlp_ratio', 15360 / 1792):.2f}; Mistral width {sizes['hidden_size']}, "
        f"{sizes['num_hidden_layers']} layer(s), {sizes['num_attention_heads']}/{sizes['num_key_value_heads']} heads, "
        f"MLP {sizes['intermediate_size']}; vocab {VOCAB_SIZE}; {NUM_QUERY} tokens per image"
    )


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
        from .bench_video import bench_video

        bench_video(bench, preset_name)
    from .bench_demo import bench_demo

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


if __name__ == "__main__":
    sys.exit(main())
