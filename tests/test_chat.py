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
    assert prompt.startswith("<s><|system|>\nYou are an artificial intelligence assistant")
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


# ---------------------------------------------------------------------------------------------------------------
# chat() never answers wrong, never hangs, and takes what the processor and the template take
# ---------------------------------------------------------------------------------------------------------------


def spy_generate(model, monkeypatch):
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **k: calls.append(k) or original(**k))
    return calls


def test_a_streaming_error_reaches_the_caller(model):
    import threading

    outcome = []

    def consume():
        try:
            list(model.chat(image=photo(), msgs=[{"role": "user", "content": QUESTION}], stream=True, no_such_kwarg=1))
        except ValueError as error:
            outcome.append(error)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the stream hangs after an error in generate"
    assert outcome and "no_such_kwarg" in str(outcome[0])


def test_the_feature_cache_never_outlives_the_vision_weights(folder, monkeypatch):
    """Changing the vision side in place (a normal in-place op, or a write through `.data`), or wrapping it with a
    PEFT adapter, makes the next turn about the same image encode it again and answer like a fresh model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    image, msgs = photo(seed=30), [{"role": "user", "content": QUESTION}]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    model.chat(image=image, msgs=msgs, **greedy())
    with vision_forwards(model) as calls:
        model.chat(image=image, msgs=msgs, **greedy())
    assert calls == []  # unchanged weights: the cache answers

    adapter = folder.parent / "adapter"
    config = LoraConfig(target_modules=["kv_proj", "qkv"], init_lora_weights=False, r=4)
    torch.manual_seed(1)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), config).save_pretrained(adapter)
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), adapter)
    wrapped = PeftModel.from_pretrained(model, adapter)
    seen, expected = spy_generate(model, monkeypatch), spy_generate(fresh.base_model.model, monkeypatch)
    assert wrapped.chat(image=image, msgs=msgs, **greedy()) == fresh.chat(image=image, msgs=msgs, **greedy())
    torch.testing.assert_close(seen[-1]["vision_hidden_states"], expected[-1]["vision_hidden_states"])

    for change in (lambda p: p.mul_(0.5), lambda p: p.data.add_(1.0)):
        before = seen[-1]["vision_hidden_states"]
        with torch.no_grad():
            change(model.model.resampler.proj)
        model.chat(image=image, msgs=msgs, **greedy())
        assert not torch.equal(seen[-1]["vision_hidden_states"], before)


def test_an_exif_rotated_jpeg_reads_the_same_by_path_and_as_an_opened_image(model, tmp_path, monkeypatch):
    from PIL import ImageOps

    stored = photo(120, 80, seed=31)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (80, 120)
    calls = spy_generate(model, monkeypatch)
    for image in (str(path), path, Image.open(path), upright):
        model.chat(image=image, msgs=[{"role": "user", "content": QUESTION}], **greedy())
    features = [call["vision_hidden_states"] for call in calls]
    for other in features[:3]:
        torch.testing.assert_close(other, features[3], atol=1e-6, rtol=0)


def test_strings_are_text_and_paths_and_typed_parts_are_images(model, tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    photo(seed=32).save(path)
    calls = spy_generate(model, monkeypatch)
    as_text = model.chat(msgs=[{"role": "user", "content": [str(path), QUESTION]}], **greedy())
    assert "vision_hidden_states" not in calls[-1] and isinstance(as_text, str)
    parts = [
        [path, QUESTION],
        [{"type": "image", "image": str(path)}, QUESTION],
        [{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": QUESTION}],
        [{"type": "image", "path": str(path)}, QUESTION],
    ]
    answers = [model.chat(msgs=[{"role": "user", "content": content}], **greedy()) for content in parts]
    assert len(set(answers)) == 1
    for call in calls[-4:]:
        torch.testing.assert_close(call["vision_hidden_states"], calls[-1]["vision_hidden_states"])


def test_video_parts_and_frame_arrays_are_frames(model, monkeypatch):
    frames = [photo(seed=40 + i) for i in range(3)]
    array = np.stack([np.asarray(frame) for frame in frames])
    calls = spy_generate(model, monkeypatch)
    answers = [
        model.chat(msgs=[{"role": "user", "content": frames + [QUESTION]}], **greedy()),
        model.chat(msgs=[{"role": "user", "content": [{"type": "video", "video": frames}, QUESTION]}], **greedy()),
        model.chat(msgs=[{"role": "user", "content": [array, QUESTION]}], **greedy()),
    ]
    assert len(set(answers)) == 1
    assert all(call["vision_hidden_states"].shape[0] == 3 for call in calls)
    assert all(torch.equal(call["input_ids"], calls[0]["input_ids"]) for call in calls)


def test_num_return_sequences_gives_that_many_answers(model):
    msgs = [{"role": "user", "content": QUESTION}]
    answers = model.chat(image=photo(), msgs=msgs, num_beams=2, num_return_sequences=2, **greedy())
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    batch = model.chat(image=[photo(), photo(seed=1)], msgs=[msgs, msgs], num_beams=2, num_return_sequences=2, **greedy())
    assert [len(answers) for answers in batch] == [2, 2]


def test_pipeline_batch_size_two_equals_single_calls(folder):
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": photo(seed=s)}, {"type": "text", "text": QUESTION}]}]
        for s in (50, 51)
    ]
    generate = {"max_new_tokens": 6, "do_sample": False}
    singles = [pipe(text=c, return_full_text=False, generate_kwargs=generate)[0]["generated_text"] for c in conversations]
    batch = pipe(text=conversations, batch_size=2, return_full_text=False, generate_kwargs=generate)
    assert [out[0]["generated_text"] for out in batch] == singles


def test_a_placeholder_written_in_the_text_takes_the_image(model):
    image = photo(seed=52)
    written = model.chat(image=image, msgs=[{"role": "user", "content": f"<image>\n{QUESTION}"}], **greedy())
    assert written == model.chat(image=image, msgs=[{"role": "user", "content": QUESTION}], **greedy())


def test_friendly_errors(model, tmp_path):
    with pytest.raises(ValueError, match=r"role \(system, user or assistant\)"):
        model.chat(image=photo(), msgs=[{"role": "human", "content": QUESTION}])
    model.save_pretrained(tmp_path / "weights-only")
    alone = AutoModelForCausalLM.from_pretrained(tmp_path / "weights-only", trust_remote_code=True)
    with pytest.raises(ValueError, match="save the processor too"):
        alone.chat(msgs=[{"role": "user", "content": QUESTION}])


def test_chat_with_the_model_offloaded_to_disk(folder, model, tmp_path):
    offloaded = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, device_map="auto", max_memory={"cpu": "12MB"},
        offload_folder=str(tmp_path),
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    msgs = [{"role": "user", "content": QUESTION}]
    assert offloaded.chat(image=photo(seed=53), msgs=msgs, **greedy()) == model.chat(image=photo(seed=53), msgs=msgs, **greedy())
