"""The OmniLMM tokenizer: Mistral v0.1 SentencePiece vocabulary + 9 special tokens, BOS, left padding with <unk>,
and the Zephyr chat template of SPEC section 7 (expected strings are written out by hand here)."""

import json
import shutil

import pytest

from omnilmm_tools.remote import ROOT
from omnilmm_tools.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer,
    check_added_tokens,
    mistral_v01_vocab_file,
    save_tokenizer,
)

SYSTEM = (
    "You are an artificial intelligence assistant, which gives helpful, detailed, and polite answers to the "
    "human's questions."
)
TEXTS = [
    "Hello world",
    " Hello",
    "Hello\nworld  x",
    "  two spaces",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x**2  # comment",
    "Zürich naïve café — “quotes” … 日本語 😀",
    "1234567890 3.14159\tTab",
]


def test_special_tokens_and_vocabulary(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(32000, 32009))
    assert SPECIAL_TOKENS == (
        "<im_patch>", "<im_start>", "<im_end>", "<box>", "</box>", "<ref>", "</ref>", "<quad>", "</quad>"
    )
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 32000, 32001, 32002]) == [
        "<unk>", "<s>", "</s>", "<im_patch>", "<im_start>", "<im_end>"
    ]
    assert len(tokenizer) == 32000 + 9
    assert tokenizer.vocab_size == 32000
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    # Special tokens are whole tokens inside text.
    assert tokenizer("<im_start><im_patch><im_end>", add_special_tokens=False).input_ids == [32001, 32000, 32002]


def test_matches_sentencepiece(tokenizer):
    spm = pytest.importorskip("sentencepiece")
    processor = spm.SentencePieceProcessor(model_file=str(mistral_v01_vocab_file()))
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False).input_ids == processor.encode(text), text
    # Every chunk between special tokens is encoded as SentencePiece would encode it alone (legacy behaviour).
    text = "<|user|>\nWhat is this?</s>\n<|assistant|>\n"
    first, second = text.split("</s>")
    expected = processor.encode(first) + [2] + processor.encode(second)
    assert tokenizer(text, add_special_tokens=False).input_ids == expected


def test_bos_added_once_no_eos(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids[0] == 1 and ids.count(1) == 1, text
        assert ids[-1] != 2
        assert tokenizer(text, add_special_tokens=False).input_ids == ids[1:]
    assert tokenizer("").input_ids == [1]


def test_pad_token_and_left_padding(tokenizer):
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["Hi", "a literal <unk> in the text, and more words"], padding=True)
    short, long = batch.input_ids
    n_pad = len(long) - len(tokenizer("Hi").input_ids)
    assert n_pad > 0
    assert short[:n_pad] == [0] * n_pad and short[n_pad] == 1  # left padding, then BOS
    assert batch.attention_mask[0] == [0] * n_pad + [1] * (len(short) - n_pad)
    # The literal <unk> is a real token with id 0: it is attended to, only padding is masked.
    assert 0 in long
    assert batch.attention_mask[1] == [1] * len(long)
    tensors = tokenizer(["Hi", "Hello there"], padding=True, return_tensors="pt")
    assert tensors.input_ids.shape == tensors.attention_mask.shape


def test_decode_skips_image_spans(tokenizer):
    ids = tokenizer("<im_start><im_patch><im_patch><im_end>\nWhat is this?").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nWhat is this?"
    assert tokenizer.decode(ids).startswith("<s><im_start><im_patch>")


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_default_system(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert render(tokenizer, messages, add_generation_prompt=True) == (
        "<s><|system|>\n" + SYSTEM + "</s>\n"
        "<|user|>\nWhat is the capital of France?</s>\n"
        "<|assistant|>\n"
    )
    assert render(tokenizer, messages) == (
        "<s><|system|>\n" + SYSTEM + "</s>\n<|user|>\nWhat is the capital of France?</s>\n"
    )


def test_chat_template_system_and_multi_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ]
    assert render(tokenizer, messages, add_generation_prompt=True) == (
        "<s><|system|>\nBe brief.</s>\n"
        "<|user|>\nHi!</s>\n"
        "<|assistant|>\nHello. How can I help?</s>\n"
        "<|user|>\nName a colour.</s>\n"
        "<|assistant|>\n"
    )
    # Without a system message the default one is used, also in multi-turn chats.
    assert render(tokenizer, messages[1:3]) == (
        "<s><|system|>\n" + SYSTEM + "</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello. How can I help?</s>\n"
    )


def test_chat_template_content_lists(tokenizer):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is in this image?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare:"},
                {"type": "image", "url": "https://example.com/a.png"},
                {"type": "image", "image": "b.png"},
                {"type": "text", "text": "Which is bigger?"},
            ],
        },
    ]
    assert render(tokenizer, messages, add_generation_prompt=True) == (
        "<s><|system|>\n" + SYSTEM + "</s>\n"
        "<|user|>\n<image>\nWhat is in this image?</s>\n"
        "<|assistant|>\nA cat.</s>\n"
        "<|user|>\nCompare:\n<image>\n<image>\nWhich is bigger?</s>\n"
        "<|assistant|>\n"
    )
    system_list = [{"role": "system", "content": [{"type": "text", "text": "Sys"}]}, {"role": "user", "content": "x"}]
    assert render(tokenizer, system_list) == "<s><|system|>\nSys</s>\n<|user|>\nx</s>\n"


def test_chat_prompt_tokenizes_with_one_bos(tokenizer):
    # The template writes BOS, as transformers' chat templates do: tokenized as `apply_chat_template(tokenize=True)`
    # and vLLM's chat tokenize it (no special tokens added), the prompt has exactly one.
    messages = [{"role": "user", "content": "Hi"}]
    prompt = render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"] == ids
    assert ids.count(2) == 2  # the </s> closing the system and the user turn


def test_added_tokens_check(fixtures_dir):
    real = json.loads((fixtures_dir / "omnilmm-12b" / "added_tokens.json").read_text())
    check_added_tokens(real)  # the release's ids are ours
    tiny = json.loads((fixtures_dir / "omnilmm-tiny-original" / "original" / "added_tokens.json").read_text())
    with pytest.raises(ValueError, match="1000"):
        check_added_tokens(tiny)  # ids 1000.. do not fit the 32000-token vocabulary
    with pytest.raises(ValueError, match="missing"):
        check_added_tokens({k: v for k, v in real.items() if k != "<quad>"})
    with pytest.raises(ValueError, match="unexpected"):
        check_added_tokens({**real, "<extra>": 32009})
    with pytest.raises(ValueError):
        build_tokenizer(added_tokens=tiny)


def test_top_level_tokenizer_config():
    config = json.loads((ROOT / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["pad_token"] == "<unk>" and config["padding_side"] == "left"
    assert config["extra_special_tokens"] == list(SPECIAL_TOKENS)
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items() if int(k) >= 32000} == {
        32000 + i: token for i, token in enumerate(SPECIAL_TOKENS)
    }
    assert "<|assistant|>" in config["chat_template"]


def test_save_and_auto_tokenizer_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "saved"
    save_tokenizer(folder, tokenizer)
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {p.name for p in folder.iterdir()}
    prompt = render(tokenizer, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    texts = TEXTS + [prompt, "<im_start><im_patch><im_end> after", "a <unk> b"]

    saved_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved_config["add_bos_token"] is True and saved_config["add_eos_token"] is False
    loaded = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        assert loaded(text).input_ids == tokenizer(text).input_ids, text
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.pad_token_id, loaded.padding_side) == (0, "left")
    assert loaded.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(32000, 32009))
    batch = loaded(["x", "a longer text"], padding=True)
    assert batch.input_ids[0][0] == 0 and batch.attention_mask[0][0] == 0

    # A model folder holding tokenizer.json and the project's tokenizer_config.json copied verbatim also loads.
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(folder / "tokenizer.json", copied)
    shutil.copy(ROOT / "tokenizer_config.json", copied)
    loaded = AutoTokenizer.from_pretrained(copied)
    for text in texts:
        assert loaded(text).input_ids == tokenizer(text).input_ids, text
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.pad_token_id, loaded.padding_side) == (0, "left")
