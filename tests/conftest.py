import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
TINY = FIXTURES / "omnilmm-tiny-original"


@pytest.fixture(scope="session")
def fixtures_dir():
    assert FIXTURES.is_dir(), f"reference fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer():
    """The real Mistral v0.1 vocabulary plus OmniLMM's 9 special tokens (built once: it takes seconds)."""
    from omnilmm_tools.tokenizer import build_tokenizer

    return build_tokenizer()


def make_tiny_model_folder(path, tokenizer, slice_mode=False, num_query=16, seed=0, **image_processor_kwargs):
    """A random tiny OmniLMM with the real tokenizer, saved as a Hub folder (model, processor, remote code)."""
    import torch

    from omnilmm_tools.convert import copy_remote_code, generation_config
    from omnilmm_tools.remote import remote_module
    from omnilmm_tools.tokenizer import save_processor

    config = remote_module("configuration_omnilmm").OmniLMMConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_query=num_query,
        vision_tower_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = remote_module("modeling_omnilmm").OmniLMMForCausalLM(config).eval()
    image_processor = remote_module("image_processing_omnilmm").OmniLMMImageProcessor(
        slice_mode=slice_mode, **image_processor_kwargs
    )
    processor = remote_module("processing_omnilmm").OmniLMMProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_query=num_query
    )
    model.save_pretrained(path)
    save_processor(processor, path)
    generation_config(config).save_pretrained(path)
    copy_remote_code(path)
    return path


def make_original_folder(folder):
    """A random OmniLMM in the original release's format: vocab 32009, bf16 pickle, no tokenizer files."""
    import json

    import torch

    from omnilmm_tools.remote import remote_module

    folder.mkdir(parents=True)
    config_dict = json.loads((TINY / "original" / "config.json").read_text())
    config_dict.update(vocab_size=32009, pad_token_id=0)
    config = remote_module("configuration_omnilmm").OmniLMMConfig(**config_dict)
    torch.manual_seed(0)
    model = remote_module("modeling_omnilmm").OmniLMMForCausalLM(config)
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    tokens = ["<im_patch>", "<im_start>", "<im_end>", "<box>", "</box>", "<ref>", "</ref>", "<quad>", "</quad>"]
    (folder / "added_tokens.json").write_text(json.dumps({t: 32000 + i for i, t in enumerate(tokens)}))
    (folder / "generation_config.json").write_text((TINY / "original" / "generation_config.json").read_text())
    return folder


def run_converter(original, dst):
    """`python -m omnilmm_tools.convert original dst` in 1 MB shards (a sharded folder); `dst` when it succeeds."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "omnilmm_tools.convert", str(original), str(dst),
                             "--max-shard-size", "1MB"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return dst


def make_sentencepiece(folder, vocab_size):
    """A SentencePiece BPE `tokenizer.model` of `vocab_size` pieces (byte fallback, Mistral-style control pieces),
    trained on generated words; its path."""
    import random

    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    (folder / "text.txt").write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(4000)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "text.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    return folder / "tokenizer.model"


MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")  # the cgroup v1 memory controller (root only)


def run_in_memory_cgroup(command, limit_bytes=None, timeout=900):
    """Run `command` in a new memory cgroup (v1) limited to `limit_bytes` (None: unlimited), as a laptop's memory
    limits it: the kernel reclaims page cache first and kills the process when what it holds does not fit. Returns
    the `CompletedProcess` and the cgroup's peak usage in bytes (its resident memory and the page cache it read)."""
    import itertools
    import subprocess

    if not (MEMORY_CGROUPS / "cgroup.procs").is_file() or not os.access(MEMORY_CGROUPS, os.W_OK):
        raise RuntimeError(f"the memory-limit tests need the cgroup v1 memory controller at {MEMORY_CGROUPS}, "
                           "writable (run them as root)")
    for n in itertools.count():
        group = MEMORY_CGROUPS / f"omnilmm-test-{os.getpid()}-{n}"
        if not group.exists():
            break
    group.mkdir()
    try:
        if limit_bytes is not None:
            (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            if (group / "memory.memsw.limit_in_bytes").is_file():  # no swapping out of the limit either
                (group / "memory.memsw.limit_in_bytes").write_text(str(int(limit_bytes)))
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        return result, int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        group.rmdir()


def drop_page_cache(folder):
    """Evict `folder`'s files from the page cache, so that a process reading them next pays for their pages."""
    for path in Path(folder).iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
