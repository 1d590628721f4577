"""What every comparison of `omnilmm-bench` shares: the sizes, the timing and reporting, the inputs and the random
models, and the small measuring helpers."""

import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..remote import remote_module

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
        "reps": dict(preprocess=5, vision=4, overhead=7, multiturn=6, batched=2, load=9, serving=2, quantize=1,
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


def image_prompt_ids(processor, text, grid=None):
    """Token ids of a one-image prompt (`<image>` expanded for `grid`), as a `(1, L)` tensor."""
    placeholder = processor.image_placeholder(grid)
    return processor.tokenizer(text.replace("<image>", placeholder), return_tensors="pt")["input_ids"]


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
    from ..tokenizer import build_tokenizer

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
# Measuring helpers
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


def folder_bytes(folder: Path, pattern="*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def import_baseline_rss() -> int:
    """Peak RSS of a Python that only imports the converter (torch, transformers, timm): the floor of any
    conversion's peak."""
    command = [sys.executable, "-c", "import omnilmm_tools.convert, omnilmm_tools.tokenizer"]
    return run_sampled(command, str(Path(__file__).resolve().parent.parent.parent))[0]["VmHWM"]


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
