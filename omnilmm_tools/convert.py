"""`omnilmm-convert SRC DST`: an original OmniLMM release folder → a self-contained Hub remote-code folder.

SRC holds `config.json`, `pytorch_model.bin` (a torch pickle; or `pytorch_model.bin.index.json` and its parts),
`added_tokens.json` and optionally the tokenizer files. DST gets `config.json` (with `auto_map` and the image token
ids), sharded safetensors, `generation_config.json`, the remote-code `.py` files, the tokenizer and processor
files, and a model card. Pickles are read with `weights_only=True` (no code runs) and `mmap=True`, and shards are
written one at a time, so a 23 GB checkpoint never sits in memory whole.
"""

import ctypes
import json
import mmap
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .cli import Parser, fail
from .model_card import converted_model_card
from .remote import REMOTE_CODE_FILES, ROOT, remote_module

IMAGE_TOKENS = {"<im_patch>": "im_patch_token_id", "<im_start>": "im_start_token_id", "<im_end>": "im_end_token_id"}
# The original `chat()`'s sampling settings (MiniCPM-V / OmniLMM model cards).
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_k": 30, "top_p": 0.9, "repetition_penalty": 1.1}
# Buffers that older checkpoints may carry and that the model recomputes.
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: is {path.parent} an original OmniLMM folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_config(src: Path):
    """The original `config.json` with the image token ids of `added_tokens.json` moved into it."""
    config_dict = read_json(src / "config.json")
    if not isinstance(config_dict, dict):
        raise ValueError(f"{src / 'config.json'} must hold a JSON object")
    added_path = src / "added_tokens.json"
    added_tokens = read_json(added_path) if added_path.is_file() else {}
    if not isinstance(added_tokens, dict):
        raise ValueError(f"{added_path} must hold a JSON object token -> id")
    for token, key in IMAGE_TOKENS.items():
        if token in added_tokens:
            if isinstance(added_tokens[token], bool) or not isinstance(added_tokens[token], int):
                raise ValueError(f"{added_path}: the id of {token} must be an integer, got {added_tokens[token]!r}")
            config_dict[key] = added_tokens[token]
    config_dict.pop("auto_map", None)
    config_dict.pop("_name_or_path", None)
    config_dict["architectures"] = ["OmniLMMForCausalLM"]
    config_dict["use_cache"] = True  # the release said false; generation always wants the KV cache
    try:
        config = remote_module("configuration_omnilmm").OmniLMMConfig(**config_dict)
    except Exception as error:  # wrong types or values: ours, Mistral's strict fields, transformers' own checks
        raise ValueError(f"{src / 'config.json'} is not a valid OmniLMM config: {error}") from None
    outside = {key: getattr(config, key) for key in IMAGE_TOKENS.values()}
    outside = {key: value for key, value in outside.items() if not 0 <= value < config.vocab_size}
    if outside:
        raise ValueError(f"image token ids {outside} do not fit the vocabulary of {config.vocab_size} tokens")
    return config, added_tokens


def checkpoint_files(src: Path) -> list[Path]:
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{index} must hold a 'weight_map' object tensor name -> file name")
        names = sorted(set(weight_map.values()))
        outside = [name for name in names if Path(name).name != name]
        if outside:
            raise ValueError(f"{index} names files outside {src}: {outside[:3]}")
        missing = [name for name in names if not (src / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names checkpoint files that are missing: {missing[:3]}")
        return [src / name for name in names]
    single = src / "pytorch_model.bin"
    if not single.is_file():
        raise FileNotFoundError(f"{src} has neither pytorch_model.bin nor pytorch_model.bin.index.json")
    return [single]


def load_pickle(path: Path) -> dict:
    """A state dict from a torch pickle, memory-mapped, refusing anything but tensors (no code runs)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises UnpicklingError/RuntimeError for code, corruption or truncation
        raise ValueError(
            f"{path} is not a plain tensor checkpoint and was refused (it is loaded with weights_only=True, so "
            f"no code in it runs): {error}"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} must hold a dict of tensors (a state dict)")
    return state_dict


def expected_state_dict_shapes(config) -> dict[str, tuple]:
    """Names and shapes of the model's state dict, built on the meta device (no memory, seconds)."""
    try:
        with torch.device("meta"):
            model = remote_module("modeling_omnilmm").OmniLMMForCausalLM(config)
    except Exception as error:  # an unknown timm tower, bad timm arguments, negative sizes, ...
        raise ValueError(f"the config does not build an OmniLMM model: {type(error).__name__}: {error}") from None
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
WRITE_CHUNK_BYTES = 64 * 2**20  # tensors are copied to the shard files this many bytes at a time


class MappedPages:
    """Drops pages of a memory-mapped checkpoint from this process's resident set once they have been copied.

    `torch.load(mmap=True)` maps the whole pickle privately; every page read stays resident (and counts in RSS)
    until the mapping goes, so copying a 23 GB checkpoint would end with 23 GB resident. `madvise(MADV_DONTNEED)`
    on a clean private file mapping just unmaps the pages (they stay in the page cache, a later read refaults
    them). Only addresses inside a mapping of the checkpoint file are ever released (Linux; a no-op elsewhere).
    """

    def __init__(self, path: Path):
        self.ranges = []
        self.madvise = None
        if not sys.platform.startswith("linux"):
            return
        try:
            target = os.path.realpath(path)
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip() == target:
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        self.ranges.append((start, end))
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.madvise = libc.madvise
        except (OSError, AttributeError):
            self.ranges = []

    def release(self, address: int, nbytes: int) -> None:
        page = mmap.PAGESIZE
        for start, end in self.ranges:
            low, high = max(address - address % page, start), min(address + nbytes, end)
            if low < high:
                high += -high % page
                self.madvise(low, min(high, end) - low, 4)  # MADV_DONTNEED


def write_safetensors(path: Path, tensors: dict, metadata: dict, pages: MappedPages | None = None) -> int:
    """Write `tensors` as a safetensors file, streaming each one's bytes from where it lies (the mmap'd pickle)
    in `WRITE_CHUNK_BYTES` pieces and releasing the source pages behind it: no copy of the shard is ever held.
    Returns the file size."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for tensor in tensors.values():
            source = tensor if tensor.is_contiguous() else tensor.contiguous()
            data = source.reshape(-1).view(torch.uint8).numpy()
            for start in range(0, data.size, WRITE_CHUNK_BYTES):
                handle.write(data[start : start + WRITE_CHUNK_BYTES])
                if pages is not None and source is tensor:
                    pages.release(source.data_ptr() + start, min(WRITE_CHUNK_BYTES, data.size - start))
    return 8 + len(blob) + offset


def convert_weights(src: Path, dst: Path, config, max_shard_size: int) -> dict:
    """Stream the pickle(s) into safetensors shards of at most `max_shard_size` bytes; returns the weight map.

    Tensors are checked against the model's layout, then copied from the memory-mapped pickle straight into the
    shard file and their pages released: resident memory stays at about one `WRITE_CHUNK_BYTES` piece."""
    expected = expected_state_dict_shapes(config)
    seen, weight_map, shard, shard_bytes, shards = set(), {}, {}, 0, []

    def flush(pages):
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            write_safetensors(dst / name, shard, {"format": "pt"}, pages)
            shards.append(name)
            weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for path in checkpoint_files(src):
        state_dict = load_pickle(path)
        pages = MappedPages(path)
        for key in tqdm(list(state_dict), desc=f"converting {path.name}", unit="tensor"):
            tensor = state_dict.pop(key)
            if key.endswith(IGNORED_KEY_SUFFIXES):
                continue
            if key not in expected:
                raise ValueError(f"{path} holds {key!r}, which the OmniLMM model at this config does not have")
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)} in {path}, the config needs {expected[key]}")
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_size:
                flush(pages)
            shard[key] = tensor  # a view of the mmap'd pickle: written (and its pages released) by flush()
            shard_bytes += size
            seen.add(key)
        flush(pages)  # before the next file's mapping replaces this one
        del state_dict
    persistent_missing = sorted(set(expected) - seen)
    if persistent_missing:
        raise ValueError(f"the checkpoint lacks {len(persistent_missing)} tensors, e.g. {persistent_missing[:5]}")
    if len(shards) == 1:
        (dst / shards[0]).rename(dst / "model.safetensors")
        return {key: "model.safetensors" for key in weight_map}
    total = sum((dst / name).stat().st_size for name in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def generation_config(config, original: dict | None = None) -> GenerationConfig:
    """The original generation settings (if any) plus the original `chat()`'s sampling defaults, KV cache on."""
    original = {k: v for k, v in (original or {}).items() if not k.startswith("_") and k != "transformers_version"}
    settings = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, **original}
    settings = {**settings, **SAMPLING_DEFAULTS, "use_cache": True, "max_new_tokens": 1024}
    return GenerationConfig(**settings, suppress_tokens=image_span_token_ids(config))


def image_span_token_ids(config) -> list[int]:
    """`<im_patch>`, `<im_start>`, `<im_end>`: input only, so generation configs suppress them (a generated span
    could not take an image)."""
    return [config.im_patch_token_id, config.im_start_token_id, config.im_end_token_id]


def write_generation_config(src: Path, dst: Path, config) -> None:
    original = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    generation_config(config, original).save_pretrained(dst)


def copy_remote_code(dst: Path) -> None:
    for name in REMOTE_CODE_FILES:
        shutil.copy2(ROOT / name, dst / name)


def write_processor(src: Path, dst: Path, config, added_tokens: dict, tokenizer_file: Path | None = None) -> bool:
    """Image processor, tokenizer and processor files. The tokenizer is `tokenizer_file` (a SentencePiece
    `tokenizer.model`), else `src`'s own, else the Mistral v0.1 vocabulary when the config fits it; with none of them
    only the image processor is written (with a warning)."""
    image_processor = remote_module("image_processing_omnilmm").OmniLMMImageProcessor(image_size=config.image_size)
    tokenizer_file = tokenizer_file or (src / "tokenizer.model" if (src / "tokenizer.model").is_file() else None)
    if tokenizer_file is None and (config.im_patch_token_id != 32000 or config.vocab_size != 32009):
        print(
            f"warning: {src} has no tokenizer files, and its image tokens (<im_patch> = {config.im_patch_token_id}, "
            f"vocabulary of {config.vocab_size}) do not fit the Mistral v0.1 vocabulary (32000 + 9 tokens): "
            "only the image processor was written. Give the model's tokenizer.model with --tokenizer to convert it."
        )
        type(image_processor).register_for_auto_class("AutoImageProcessor")  # writes its auto_map entry
        image_processor.save_pretrained(dst)
        return False
    from .tokenizer import build_tokenizer, save_processor

    tokenizer = build_tokenizer(added_tokens or None, vocab_file=tokenizer_file)
    if len(tokenizer) > config.vocab_size:  # (fewer is fine: embedding rows may be padding)
        raise ValueError(f"the tokenizer {tokenizer_file or 'of Mistral v0.1'} has {len(tokenizer)} tokens with the "
                         f"image tokens, more than the model's vocabulary of {config.vocab_size}: it is not this "
                         "model's tokenizer")
    processor = remote_module("processing_omnilmm").OmniLMMProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_query=config.num_query,
        max_position_embeddings=config.max_position_embeddings,
    )
    save_processor(processor, dst)
    return True


def write_model_card(dst: Path, src: Path, config) -> None:
    (dst / "README.md").write_text(converted_model_card(config, src))


def convert(src, dst, max_shard_size="2GB", tokenizer=None) -> Path:
    """Convert the original-format folder `src` into the Hub folder `dst` (created; must be empty if it exists).
    `tokenizer`: the SentencePiece `tokenizer.model` to use (or a folder holding one) when `src` has none."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty (or not a folder); give a new folder")
    tokenizer_file = tokenizer_model_file(tokenizer)
    config, added_tokens = load_config(src)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        convert_weights(src, dst, config, parse_size(max_shard_size))
        config.save_pretrained(dst)
        write_generation_config(src, dst, config)
        copy_remote_code(dst)
        write_processor(src, dst, config, added_tokens, tokenizer_file)
        write_model_card(dst, src, config)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # it was new or empty: leave no half-written folder behind
        raise
    return dst


def tokenizer_model_file(path) -> Path | None:
    """`--tokenizer`: a `tokenizer.model` file, or a folder holding one (`None`: none given)."""
    if path is None:
        return None
    path = Path(path)
    path = path / "tokenizer.model" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no SentencePiece tokenizer.model at {path}")
    return path


def main(argv=None) -> None:
    parser = Parser("omnilmm-convert", __doc__.split("\n\n")[0])
    parser.add_argument("src", help="the original release folder (config.json, pytorch_model.bin, added_tokens.json)")
    parser.add_argument("dst", help="the Hub folder to write (new or empty)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's SentencePiece tokenizer.model (or its folder), for a SRC without one")
    args = parser.parse_args(argv)
    try:
        dst = convert(args.src, args.dst, args.max_shard_size, args.tokenizer)
    except (OSError, ValueError) as error:  # a missing or bad input, an existing output, a full disk ...
        fail(parser.prog, error)
    print(f"wrote {dst}: load it with AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
