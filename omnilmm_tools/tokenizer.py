"""The OmniLMM tokenizer, built offline: Mistral-7B v0.1's SentencePiece vocabulary + 9 special tokens.

OmniLMM-12B (trained from Zephyr-7B-beta, a Mistral-7B v0.1 fine-tune) uses Mistral v0.1's 32,000-piece
SentencePiece BPE vocabulary, plus the image and grounding tokens ``<im_patch>`` (32000), ``<im_start>``,
``<im_end>``, ``<box>``, ``</box>``, ``<ref>``, ``</ref>``, ``<quad>``, ``</quad>`` (32001..32008).

The ``mistral-common`` wheel ships that exact vocabulary (``mistral_common/data/tokenizer.model.v1``), so
the tokenizer is built here without any download. The fast (``tokenizers``) pipeline reproduces the
"legacy" Llama/Mistral fast tokenizer the original ran with (transformers 4.x converted
``tokenizer.model`` to exactly this): a ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer (so every
text chunk between special tokens gets SentencePiece's dummy prefix), no pre-tokenizer, byte-fallback BPE
with the merges ranked by the SentencePiece piece scores, and a ``<s> $A`` post-processor (BOS added,
no EOS). It encodes like ``sentencepiece.SentencePieceProcessor.encode`` chunk by chunk.

Everything else (special tokens, ``<unk>`` as pad token, left padding, the Zephyr chat template) comes
from the project's top-level ``tokenizer_config.json``, the single source of truth that is also what the
saved tokenizer folder carries.

Note that transformers 5 saves ``add_bos_token`` into ``tokenizer.json``'s post-processor, not into
``tokenizer_config.json``, and its ``tokenizer.apply_chat_template(..., tokenize=True)`` always tokenizes
with ``add_special_tokens=False``. The chat template therefore starts with BOS (``<s><|system|>\\n...``), as
Mistral's own templates do: tokenized with or without special tokens (``tokenizer(prompt)``, the tokenizer's or
the processor's ``apply_chat_template(..., tokenize=True)``, vLLM's chat) the prompt has BOS exactly once, since
the processor drops a doubled one.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

from .remote import ROOT

SPECIAL_TOKENS = (
    "<im_patch>",
    "<im_start>",
    "<im_end>",
    "<box>",
    "</box>",
    "<ref>",
    "</ref>",
    "<quad>",
    "</quad>",
)
BASE_VOCAB_SIZE = 32000
TOKENIZER_CONFIG = ROOT / "tokenizer_config.json"
DEFAULT_SYSTEM_PROMPT = (
    "You are an artificial intelligence assistant, which gives helpful, detailed, and polite answers to the "
    "human's questions."
)
# Keys of the top-level tokenizer_config.json that are passed to the tokenizer's constructor.
_INIT_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "padding_side",
    "truncation_side",
    "clean_up_tokenization_spaces",
    "model_max_length",
    "chat_template",
)


def mistral_v01_vocab_file() -> Path:
    """The Mistral-7B v0.1 SentencePiece model inside the installed ``mistral-common`` wheel."""
    try:
        path = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError:
        raise ImportError(
            "Building the OmniLMM tokenizer offline needs the `mistral-common` package (it ships the Mistral v0.1 "
            "SentencePiece vocabulary): pip install mistral-common"
        ) from None
    path = Path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mistral-common package")
    return path


def load_tokenizer_config() -> dict:
    """The project's top-level ``tokenizer_config.json``."""
    with open(TOKENIZER_CONFIG, encoding="utf-8") as handle:
        return json.load(handle)


def check_added_tokens(added_tokens: dict[str, int] | None, base_vocab_size: int = BASE_VOCAB_SIZE) -> None:
    """Raise ``ValueError`` unless ``added_tokens`` (an ``added_tokens.json``) holds exactly the 9 special tokens
    at ``base_vocab_size + 0..8``, in the order of :data:`SPECIAL_TOKENS`."""
    if added_tokens is None:
        return
    if not isinstance(added_tokens, dict):
        raise ValueError(
            f"added_tokens must be a dict token -> id (added_tokens.json), got {type(added_tokens).__name__}"
        )
    expected = {token: base_vocab_size + index for index, token in enumerate(SPECIAL_TOKENS)}
    problems = []
    missing = [token for token in expected if token not in added_tokens]
    if missing:
        problems.append(f"missing {missing}")
    unexpected = {token: added_tokens[token] for token in added_tokens if token not in expected}
    if unexpected:
        problems.append(f"unexpected tokens {unexpected}")
    wrong = {
        token: (added_tokens[token], want)
        for token, want in expected.items()
        if token in added_tokens and added_tokens[token] != want
    }
    if wrong:
        problems.append(
            "ids that differ from this vocabulary's (given, expected): "
            + ", ".join(f"{token}: {got} != {want}" for token, (got, want) in wrong.items())
        )
    if problems:
        raise ValueError(
            f"The added tokens do not match the OmniLMM tokenizer (a {base_vocab_size}-token base vocabulary + "
            f"{list(SPECIAL_TOKENS)} at {base_vocab_size}..{base_vocab_size + len(SPECIAL_TOKENS) - 1}): "
            + "; ".join(problems)
        )


def _load_sentencepiece_proto(vocab_file: Path):
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    return SentencePieceExtractor(str(vocab_file)).proto


def _backend_from_sentencepiece(proto, vocab_file: Path):
    """A ``tokenizers.Tokenizer`` equivalent to the legacy Llama/Mistral fast tokenizer of ``vocab_file``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise ValueError(f"{vocab_file} is not a SentencePiece BPE model (Mistral/Llama style)")
    pieces = list(proto.pieces)
    vocab = {piece.piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"{vocab_file} has duplicate pieces")
    # Rank the merges by piece score, as SentencePiece (and transformers 4's LlamaConverter) do: Mistral's
    # whitespace runs ("▁▁", ...) carry very low scores and so are merged last.
    scores = {piece.piece: piece.score for piece in pieces}
    merges = generate_merges(vocab, scores)
    unk = proto.trainer_spec.unk_piece or "<unk>"
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # The control pieces (<unk>, <s>, </s>) are matched as whole tokens, never split.
    control = [piece.piece for piece in pieces if piece.type in (2, 3)]  # 2 = UNKNOWN, 3 = CONTROL
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    return backend


def build_tokenizer(added_tokens: dict[str, int] | None = None, vocab_file: str | os.PathLike | None = None):
    """The OmniLMM tokenizer (a transformers 5 ``TokenizersBackend``, i.e. a fast tokenizer), built offline.

    Args:
        added_tokens: the ``added_tokens.json`` of an original OmniLMM folder, if any; its ids must be the ones
            this tokenizer gives the 9 special tokens (``ValueError`` otherwise).
        vocab_file: a SentencePiece ``tokenizer.model`` to use instead of the Mistral v0.1 one shipped in
            ``mistral-common`` (e.g. the one of the original release folder, which is the same vocabulary).

    The result adds BOS (no EOS), pads with ``<unk>`` (id 0) on the left, and carries the chat template of the
    top-level ``tokenizer_config.json``. ``AutoTokenizer.from_pretrained`` of a folder written by
    :func:`save_tokenizer` gives the same ids.
    """
    from tokenizers import AddedToken
    from transformers import TokenizersBackend

    vocab_file = Path(vocab_file) if vocab_file is not None else mistral_v01_vocab_file()
    if not vocab_file.is_file():
        raise FileNotFoundError(f"No SentencePiece model at {vocab_file}")
    proto = _load_sentencepiece_proto(vocab_file)
    base_vocab_size = len(proto.pieces)
    check_added_tokens(added_tokens, base_vocab_size)
    backend = _backend_from_sentencepiece(proto, vocab_file)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])

    config = load_tokenizer_config()
    init_kwargs = {key: config[key] for key in _INIT_KEYS if key in config}
    tokenizer = TokenizersBackend(
        tokenizer_object=backend,
        vocab_file=str(vocab_file),
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        extra_special_tokens=list(SPECIAL_TOKENS),
        **init_kwargs,
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(base_vocab_size, base_vocab_size + len(SPECIAL_TOKENS)))
    if ids != expected:  # cannot happen unless the vocabulary already holds one of them
        raise ValueError(f"The special tokens got the ids {ids}, expected {expected}")
    return tokenizer


def save_tokenizer(dst: str | os.PathLike, tokenizer=None, copy_sentencepiece: bool = True) -> list[str]:
    """Write the tokenizer files into the model folder ``dst``: ``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja`` and (``copy_sentencepiece``) the SentencePiece ``tokenizer.model`` it was built from.

    ``tokenizer`` defaults to :func:`build_tokenizer`'s. :func:`save_processor` writes the same files.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    files = [str(path) for path in tokenizer.save_pretrained(str(dst))]
    return files + _finish_tokenizer_files(dst, tokenizer, copy_sentencepiece)


def _finish_tokenizer_files(dst: Path, tokenizer, copy_sentencepiece: bool = True) -> list[str]:
    # transformers 5 keeps add_bos_token in tokenizer.json's post-processor and drops it from tokenizer_config.json;
    # write it back (as in the top-level file) for readers and loaders that look for it there.
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    project = load_tokenizer_config()
    for key in ("add_bos_token", "add_eos_token"):
        config.setdefault(key, project[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if copy_sentencepiece and isinstance(vocab_file, (str, os.PathLike)) and Path(vocab_file).is_file():
        target = dst / "tokenizer.model"
        if Path(vocab_file).resolve() != target.resolve():
            shutil.copyfile(vocab_file, target)
        return [str(target)]
    return []


def save_processor(processor, dst: str | os.PathLike) -> list[str]:
    """Write an ``OmniLMMProcessor`` into the model folder ``dst``: ``processor_config.json`` with the ``auto_map``
    entries for ``AutoProcessor`` (and, nested, ``AutoImageProcessor`` and ``AutoVideoProcessor``), so that
    ``AutoProcessor.from_pretrained(dst, trust_remote_code=True)`` returns an ``OmniLMMProcessor``, the chat template
    and the tokenizer files of :func:`save_tokenizer` (``add_bos_token`` / ``add_eos_token``, ``tokenizer.model``).
    The remote-code ``.py`` files themselves are copied by ``omnilmm_tools.convert.copy_remote_code``."""
    dst = Path(dst)
    type(processor).register_for_auto_class("AutoProcessor")
    for name, auto_class in (("image_processor", "AutoImageProcessor"), ("video_processor", "AutoVideoProcessor")):
        component_class = type(getattr(processor, name))
        if not component_class.__module__.startswith("transformers."):
            component_class.register_for_auto_class(auto_class)
    files = [str(path) for path in processor.save_pretrained(dst)]
    # The video processor on its own too (`video_preprocessor_config.json`): where vLLM looks up its class, to
    # decode videos with OmniLMM's own loader (omnilmm_tools.vllm_model).
    files += [str(path) for path in processor.video_processor.save_pretrained(dst)]
    return files + _finish_tokenizer_files(dst, processor.tokenizer)


__all__ = [
    "BASE_VOCAB_SIZE",
    "DEFAULT_SYSTEM_PROMPT",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "check_added_tokens",
    "load_tokenizer_config",
    "mistral_v01_vocab_file",
    "save_processor",
    "save_tokenizer",
]
