"""`omnilmm-quantize SRC DST --weights int4|int8`: a converted OmniLMM folder → a folder of optimum-quanto weights.

DST loads quantized as it is, with `AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)` (the remote
code reads quanto's serialization one module at a time), instead of reading the full-precision file and quantizing
it at every load. The `Linear` layers are quantized (weight-only, int4 in groups of 128 or int8 per channel), the
vision tower's included; the LM head and the resampler stay bfloat16 (`--keep`). SRC is read one tensor at a time
and DST written as it goes: the command holds about one tensor, not the model.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .cli import Parser, fail
from .convert import SAFETENSORS_DTYPES, WRITE_CHUNK_BYTES, copy_remote_code
from .remote import remote_module

WEIGHTS = ("int4", "int8")
KEEP = ("lm_head", "model.resampler")  # the logits' precision; the resampler's attention reads its own weights
# quanto's serialization of one quantized Linear (a QLinear's state dict), besides its bias
QUANTIZED_KEYS = {"int4": ("weight._data._data", "weight._scale", "weight._shift", "input_scale", "output_scale"),
                  "int8": ("weight._data", "weight._scale", "input_scale", "output_scale")}
HEADER_BYTES_PER_TENSOR = 160  # room for one tensor's header entry besides its name (dtype, 4-d shape, offsets)
SMALL_BYTES = 4096


class SafetensorsWriter:
    """A safetensors file written one tensor at a time: room for the header is left in front (its size bounded
    from the names to come), each tensor's bytes are appended as it arrives, and the header is filled in last.
    Tensors under `SMALL_BYTES` (scales, biases) are kept and written last, so that the large ones, whose sizes
    are multiples of 64 bytes in practice, start 64-byte aligned in the file and so in memory when mapped."""

    def __init__(self, path: Path, names):
        self.file = open(path, "wb")
        room = sum(len(name) + HEADER_BYTES_PER_TENSOR for name in names) + 256
        self.reserved = room + -(8 + room) % 64  # the data starts 64-byte aligned
        self.file.write(b"\0" * (8 + self.reserved))
        self.header, self.offset, self.small = {}, 0, []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.numel() * tensor.element_size() < SMALL_BYTES:
            self.small.append((name, tensor))
        else:
            self.write(name, tensor)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.offset, self.offset + nbytes]}
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        for start in range(0, data.size, WRITE_CHUNK_BYTES):
            self.file.write(data[start : start + WRITE_CHUNK_BYTES])
        self.offset += nbytes
        self.file.flush()  # to the disk and out of the page cache: written pages would pile up otherwise (a memory
        os.fdatasync(self.file.fileno())  # cgroup v1 does not throttle its dirty pages, it kills the process)
        os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self, metadata: dict) -> None:
        for name, tensor in self.small:
            self.write(name, tensor)
        blob = json.dumps({**self.header, "__metadata__": metadata}, separators=(",", ":")).encode()
        if len(blob) > self.reserved:
            raise RuntimeError(f"the header needs {len(blob)} bytes, {self.reserved} were reserved")
        self.file.seek(0)
        self.file.write(self.reserved.to_bytes(8, "little"))
        self.file.write(blob + b" " * (self.reserved - len(blob)))  # (the format allows trailing spaces)
        self.file.close()


def quantized_linear(weight: torch.Tensor, bias, weights: str) -> dict:
    """quanto's serialization of `Linear(weight, bias)` quantized to `weights`: what `QLinear.freeze()` then
    `state_dict()` give, computed straight in the kernel-agnostic layout (`optimized=False`) that the state dict
    holds (on a CPU, `freeze()` packs int4 for the CPU kernel, and saving unpacks it again, 0.6 s a layer)."""
    from optimum.quanto.nn import quantize_module
    from optimum.quanto.tensor.optimizers import SymmetricOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    layer = quantize_module(linear, weights=f"q{weights}")
    qtype, group_size = layer.weight_qtype, layer.weight_group_size
    if isinstance(layer.optimizer, SymmetricOptimizer):
        scale, shift = layer.optimizer(weight, qtype=qtype, axis=0), None
    else:
        scale, shift = layer.optimizer(weight, qtype=qtype, axis=0, group_size=group_size)
    layer.weight = nn.Parameter(quantize_weight(weight, qtype=qtype, axis=0, scale=scale, shift=shift,
                                                group_size=group_size, optimized=False), requires_grad=False)
    state = layer.state_dict()
    del layer, linear
    trim = remote_module("modeling_omnilmm").MALLOC_TRIM
    if trim is not None:  # glibc keeps the quantizing temporaries otherwise: the process would grow
        trim(0)
    return state


def linear_layers(src: Path, keep) -> set[str]:
    """The names of the `Linear` layers of SRC's model (built on the meta device) outside the `keep` modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and not any(name == k or name.startswith(k + ".") for k in keep)}


def source_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return [src / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    raise FileNotFoundError(f"{src} holds no model.safetensors: give a folder written by omnilmm-convert")


def quantize_folder(src, dst, weights="int4", keep=KEEP) -> Path:
    """Write `dst`: `src`'s files, its weights quantized (see the module's docstring)."""
    src, dst = Path(src), Path(dst)
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    if config is None or config.get("quanto_weights"):
        raise ValueError(f"{src} is not a full-precision OmniLMM folder (no config.json, or quantized already)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty (or not a folder); give a new folder")
    files, layers = source_files(src), linear_layers(src, keep)
    names = []
    for file in files:
        with remote_module("modeling_omnilmm").SafetensorsReader(file) as f:
            names += [f"{key[: -len('weight')]}{k}" for key in f.keys() for k in QUANTIZED_KEYS[weights]
                      if key.endswith(".weight") and key[: -len(".weight")] in layers] + list(f.keys())
    dst.mkdir(parents=True, exist_ok=True)
    try:
        writer = SafetensorsWriter(dst / "model.safetensors", names)
        for file in files:
            with remote_module("modeling_omnilmm").SafetensorsReader(file) as f:
                keys = f.keys()
                for key in tqdm(keys, desc=f"quantizing {file.name} to {weights}", unit="tensor"):
                    layer = key[: -len(".weight")] if key.endswith(".weight") else None
                    if key.endswith(".bias") and key[: -len(".bias")] in layers:
                        continue  # written with its layer
                    tensor = f.get_tensor(key).to(torch.bfloat16)
                    if layer not in layers:
                        writer.add(key, tensor)
                        continue
                    bias = f.get_tensor(f"{layer}.bias").to(torch.bfloat16) if f"{layer}.bias" in keys else None
                    for name, value in quantized_linear(tensor, bias, weights).items():
                        writer.add(f"{layer}.{name}", value)
        writer.close({"format": "pt", "quantization": f"optimum-quanto {weights}"})
        for path in src.iterdir():
            if path.is_file() and not path.name.startswith("model.safetensors") and path.suffix != ".bin":
                shutil.copy(path, dst / path.name)  # (follows links: the demo model's .py files are links)
        copy_remote_code(dst)  # the remote code that reads quantized folders
        (dst / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "quanto_weights": weights},
                                                    indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return dst


def main(argv=None) -> None:
    parser = Parser("omnilmm-quantize", __doc__.split("\n\n")[0])
    parser.add_argument("src", help="a converted OmniLMM folder (model.safetensors, config.json, ...)")
    parser.add_argument("dst", help="the folder to write (new or empty)")
    parser.add_argument("--weights", choices=WEIGHTS, default="int4", help="weight precision")
    parser.add_argument("--keep", nargs="*", default=list(KEEP), metavar="MODULE",
                        help="modules left in bfloat16")
    args = parser.parse_args(argv)
    try:
        dst = quantize_folder(args.src, args.dst, args.weights, args.keep)
    except ImportError:
        fail(parser.prog, "quantizing needs optimum-quanto: pip install 'omnilmm-hf[quantization]'")
    except (OSError, ValueError) as error:
        fail(parser.prog, error)
    size = (dst / "model.safetensors").stat().st_size
    print(f"wrote {dst} ({size / 1e9:.2f} GB of {args.weights} weights): load it with "
          f"AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
