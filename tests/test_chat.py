"""From a picture to an answer: AutoProcessor, pipeline, model.chat (batch, multi-turn, video, streaming), slicing."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

from conftest import make_tiny_model_folder

QUESTION = "What is in the picture?"


def photo(width=320, height=240, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    return make_tiny_model_folder(tmp_path_factory.mktemp("chat") / "tiny", tokenizer, image_size=112)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def slice_model(tmp_path_factory, tokenizer):
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("slice") / "tiny", tokenizer, slice_mode=True)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@contextlib.contextmanager
def vision_forwards(model):
    """Record the batch shape of every vision-tower forward inside the block."""
    tower, calls = model.model.vision_tower, []
    original = tower.forward_features
    tower.forward_features = lambda x, *a, **k: calls.append(tuple(x.shape)) or original(x, *a, **k)
    try:
        yield calls
    finally:
        del tower.forward_features


def greedy(**kwargs):
    return {"sampling": False, "max_new_tokens": 6, **kwargs}


def test_auto_processor_returns_the_omnilmm_processor(processor):
    assert type(processor).__name__ == "OmniLMMProcessor"
    assert type(processor.image_processor).__name__ == "OmniLMMImageProcessor"


def test_processor_generate_decode_equals_chat(model, processor):
    image = photo()
    answer = model.chat(image=image, msgs=[{"role": "user", "content": QUESTION}], **greedy())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|system|>\nYou are an artificial intelligence assistant")
    assert prompt.endswith(f"<|user|>\n<image>\n{QUESTION}</s>\n<|assistant|>\n")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    decoded = processor.post_process_image_text_to_text(output[:, inputs["input_ids"].shape[1] :])[0]
    assert answer == decoded.strip()
    assert len(answer) > 0


def test_pipeline_answers_one_image_and_a_batch(folder, model):
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    images = [photo(seed=1), photo(200, 300, seed=2)]
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
        for image in images
    ]
    generate = {"max_new_tokens": 6, "do_sample": False}
    single = pipe(text=conversations[0], return_full_text=False, generate_kwargs=generate)
    batch = pipe(text=conversations, return_full_text=False, generate_kwargs=generate)
    expected = [model.chat(image=image, msgs=[{"role": "user", "content": QUESTION}], **greedy()) for image in images]
    assert single[0]["generated_text"].strip() == expected[0]
    assert [out[0]["generated_text"].strip() for out in batch] == expected
    assert "<|assistant|>" not in single[0]["generated_text"]


def test_batched_chat_equals_one_conversation_at_a_time(model):
    images = [photo(seed=3), photo(seed=4)]
    msgs = [[{"role": "user", "content": QUESTION}], [{"role": "user", "content": "Short question?"}]]
    batched = model.chat(image=images, msgs=msgs, **greedy())
    alone = [model.chat(image=i, msgs=m, **greedy()) for i, m in zip(images, msgs)]
    assert batched == alone


def test_second_turn_about_the_same_image_does_no_vision_forward(model):
    image = photo(seed=5)
    msgs = [{"role": "user", "content": [image, QUESTION]}]
    with vision_forwards(model) as calls:
        first = model.chat(msgs=msgs, **greedy())
    assert len(calls) == 1
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "Are you sure?"}]
    with vision_forwards(model) as calls:
        second = model.chat(msgs=msgs, **greedy())
    assert calls == [] and isinstance(second, str)


def test_later_turns_reuse_the_preprocessing_and_answer_like_a_fresh_model(slice_model, monkeypatch):
    """A sliced image asked about again is neither preprocessed nor encoded again, and the prompt is token for token
    the processor's; a changed image (same object, new pixels) is processed anew."""
    processor = slice_model.chat_processor()
    preprocessed, prompts = [], []
    preprocess, generate = type(processor.image_processor).preprocess, slice_model.generate
    monkeypatch.setattr(type(processor.image_processor), "preprocess", lambda *a, **k: preprocessed.append(1) or preprocess(*a, **k))
    monkeypatch.setattr(slice_model, "generate", lambda **k: prompts.append(k["input_ids"]) or generate(**k))

    image = photo(896, 672, seed=40)
    msgs = [{"role": "user", "content": [image, QUESTION]}]
    msgs += [{"role": "assistant", "content": slice_model.chat(msgs=msgs, **greedy())}, {"role": "user", "content": "Why?"}]
    assert len(preprocessed) == 1
    with vision_forwards(slice_model) as calls:
        second = slice_model.chat(msgs=msgs, **greedy())
    assert len(preprocessed) == 1 and calls == []
    slice_model.clear_chat_cache()
    assert slice_model.chat(msgs=msgs, **greedy()) == second and len(preprocessed) == 2
    assert torch.equal(prompts[-1], prompts[-2])

    image.paste((0, 0, 0), (0, 0, 300, 300))
    slice_model.chat(msgs=msgs, **greedy())
    assert len(preprocessed) == 3


def test_several_images_in_one_message_are_encoded_together(model):
    first, second = photo(seed=6), photo(seed=7)
    with vision_forwards(model) as calls:
        answer = model.chat(msgs=[{"role": "user", "content": [first, second, "What differs?"]}], **greedy())
    assert calls == [(2, 3, 112, 112)] and isinstance(answer, str)


def test_video_of_twenty_frames_encodes_one_view_per_frame(slice_model):
    frames = [photo(896, 672, seed=10 + i) for i in range(20)]
    with vision_forwards(slice_model) as calls:
        slice_model.chat(msgs=[{"role": "user", "content": frames + ["What happens?"]}], **greedy(max_new_tokens=2))
    assert sum(shape[0] for shape in calls) == 20
    with vision_forwards(slice_model) as calls:
        slice_model.chat(msgs=[{"role": "user", "content": frames[:2] + ["What happens?"]}], **greedy(max_new_tokens=2))
    assert sum(shape[0] for shape in calls) > 2  # few frames are sliced: an overview plus tiles each


def test_streamed_pieces_join_to_the_greedy_answer(model):
    image, msgs = photo(seed=8), [{"role": "user", "content": QUESTION}]
    answer = model.chat(image=image, msgs=msgs, **greedy(max_new_tokens=10))
    pieces = list(model.chat(image=image, msgs=msgs, stream=True, **greedy(max_new_tokens=10)))
    assert len(pieces) >= 2
    assert "".join(pieces).strip() == answer


def test_generation_keywords_reach_generate(model, monkeypatch):
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    answer = model.chat(image=photo(), msgs=[{"role": "user", "content": QUESTION}], num_beams=2, **greedy())
    assert seen["num_beams"] == 2 and seen["do_sample"] is False and isinstance(answer, str)
    model.chat(image=photo(), msgs=[{"role": "user", "content": QUESTION}], max_new_tokens=2)
    assert seen["do_sample"] is True  # sampling=True: the settings below come from generation_config.json
    config = model.generation_config
    assert (config.temperature, config.top_k, config.top_p, config.repetition_penalty) == (0.6, 30, 0.9, 1.1)


def test_slice_mode_end_to_end(slice_model):
    processor = AutoProcessor.from_pretrained(slice_model.config._name_or_path, trust_remote_code=True)
    image = photo(1344, 1008, seed=9)
    inputs = processor(images=[image], text=["<image>\nDescribe."], return_tensors="pt")
    num_query = slice_model.config.num_query
    ids = inputs["input_ids"][0]
    assert inputs["slice_grids"][0] == [(3, 2)]
    assert len(inputs["pixel_values"][0]) == 7
    assert int((ids == slice_model.config.im_patch_token_id).sum()) == 7 * num_query
    assert int((ids == slice_model.config.im_start_token_id).sum()) == 7
    with torch.no_grad():
        together = slice_model.get_vision_embedding(inputs["pixel_values"])
        for tile, feature in zip(inputs["pixel_values"][0], together):
            torch.testing.assert_close(feature, slice_model.get_vision_embedding(tile[None])[0], atol=1e-5, rtol=0)
        output = slice_model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert output.shape[1] == ids.shape[0] + 3
