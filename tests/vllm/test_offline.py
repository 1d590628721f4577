"""vLLM's offline engine serves OmniLMM (the `omnilmm` plugin) with the same prompts and greedy tokens as
`transformers`: one image, two images, a sliced image, text only, and all of them in one batch.

Runs in `.venv-vllm` (vLLM pins its own torch and transformers); one engine per model, shared by the module."""

import base64
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from conftest import make_original_folder, run_converter
from omnilmm_tools import vllm_check
from omnilmm_tools.vllm_check import hf_greedy, vllm_messages

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 8
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TP2_THREADS = "0|1"  # VLLM_CPU_OMP_THREADS_BIND for two tensor-parallel workers: one core each (CI has two)


def shape_image(size, colour, seed=0):
    """A shape on a noisy background (a real-looking photo for the demo model's vision tower)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 60 + 100).to(torch.uint8)
    h, w = size[1], size[0]
    pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = torch.tensor(colour, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def conversations():
    """(name, content parts): images as PIL parts, the way `LLM.chat` and the server take them."""
    sample = Image.open(ROOT / "assets" / "sample.png").convert("RGB")
    red, blue = shape_image((200, 160), (220, 30, 30), 1), shape_image((180, 180), (30, 30, 220), 2)
    wide = shape_image((900, 300), (30, 200, 30), 3)
    return {
        "one image": [sample, "What colour is the shape?"],
        "two images": [red, blue, "What colour is the first shape?"],
        "sliced image": [wide, "What colour is the shape?"],
        "text only": ["Name a colour."],
    }


def start_engine(folder, **kwargs):
    from vllm import LLM

    return LLM(str(folder), trust_remote_code=True, dtype="float32", gpu_memory_utilization=0.15,
               max_model_len=2048, seed=0, allowed_local_media_path=tempfile.gettempdir(), **kwargs)


def greedy(llm, max_tokens=MAX_TOKENS):
    return vllm_check.greedy(llm, max_tokens)


def check_same_as_transformers(llm, folder):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    cases = conversations()
    expected = {name: hf_greedy(model, processor, content, MAX_TOKENS) for name, content in cases.items()}
    # the sliced case is sliced, the others are not (the demo model slices; a square-mode model never does)
    grids = {name: [g for sample in e[2].get("slice_grids", [[]]) for g in sample] for name, e in expected.items()}
    slicing = processor.image_processor.slice_mode
    assert any(g is not None for g in grids["sliced image"]) == slicing
    assert all(g is None for g in grids["one image"] + grids["two images"])
    params = greedy(llm)
    alone = {name: llm.chat(vllm_messages(content), params)[0] for name, content in cases.items()}
    batch = llm.chat([vllm_messages(content) for content in cases.values()], params)  # one mixed batch
    eos = processor.tokenizer.eos_token_id
    for (name, (prompt_ids, new_ids, _)), in_batch in zip(expected.items(), batch):
        for output in (alone[name], in_batch):
            assert output.prompt_token_ids == prompt_ids, name
            assert [t for t in output.outputs[0].token_ids if t != eos] == new_ids, name
    return expected


@pytest.fixture(scope="module")
def demo_engine():
    llm = start_engine(ROOT / "demo_model")
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_demo_model_answers_as_in_transformers(demo_engine):
    expected = check_same_as_transformers(demo_engine, ROOT / "demo_model")
    assert any(new for _, new, _ in expected.values())  # the demo model answers something, not EOS at once


def test_tensor_parallelism_answers_as_one_process(demo_engine, monkeypatch):
    """TP=2 (the decoder split over two workers, the vision tower and resampler replicated in each): the same prompt
    ids and greedy tokens as `transformers` on one image, two images, a sliced image and text, alone and batched, and
    the same as the TP=1 engine."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", TP2_THREADS)
    llm = start_engine(ROOT / "demo_model", tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        check_same_as_transformers(llm, ROOT / "demo_model")
        messages = [vllm_messages(content) for content in conversations().values()]
        split, whole = (engine.chat(messages, greedy(engine)) for engine in (llm, demo_engine))
        assert [o.outputs[0].token_ids for o in split] == [o.outputs[0].token_ids for o in whole]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_a_converted_checkpoint_in_square_mode_answers_as_in_transformers(tmp_path_factory):
    original = make_original_folder(tmp_path_factory.mktemp("original") / "OmniLMM-small")
    converted = run_converter(original, tmp_path_factory.mktemp("converted") / "hub")
    llm = start_engine(converted)
    try:
        check_same_as_transformers(llm, converted)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_a_rendered_prompt_given_as_text_has_the_processor_ids(demo_engine):
    """`LLM.generate` tokenizes a text prompt with BOS, and the rendered chat template starts with one: as in the
    processor, an image prompt still has one BOS."""
    processor = AutoProcessor.from_pretrained(ROOT / "demo_model", trust_remote_code=True)
    image, question = conversations()["one image"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = processor(text=[prompt], images=[[image]])["input_ids"][0].tolist()
    request = {"prompt": prompt, "multi_modal_data": {"image": image}}
    output = demo_engine.generate([request], greedy(demo_engine, max_tokens=1), use_tqdm=False)[0]
    assert output.prompt_token_ids == expected and expected.count(processor.tokenizer.bos_token_id) == 1


def test_max_slice_nums_is_honoured_per_request(demo_engine):
    wide = conversations()["sliced image"]
    params = greedy(demo_engine, max_tokens=1)
    sliced = demo_engine.chat(vllm_messages(wide), params)[0]
    unsliced = demo_engine.chat(vllm_messages(wide), params, mm_processor_kwargs={"max_slice_nums": 1})[0]
    processor = AutoProcessor.from_pretrained(ROOT / "demo_model", trust_remote_code=True)
    num_query = processor.num_query
    assert sliced.prompt_token_ids.count(processor.im_start_token_id) > 1
    assert unsliced.prompt_token_ids.count(processor.im_start_token_id) == 1
    assert unsliced.prompt_token_ids.count(processor.im_patch_token_id) == num_query


def video_clips(folder):
    """Shape clips (H.264 in mp4, VP9 in WebM) and the shape in each."""
    from omnilmm_tools import clips

    made = []
    for seed, suffix in ((0, ".mp4"), (1, ".webm"), (4, ".mp4")):
        frames, shape = clips.shape_frames(random.Random(seed), seconds=5, fps=6)
        made.append((clips.write_video(folder / f"shape-{seed}{suffix}", frames, 6), shape))
    return made


def test_a_video_url_answers_as_transformers_token_for_token(demo_engine, tmp_path):
    """`video_url` parts (a base64 `data:` URL, or a file) go through OmniLMM's video loader (the processor's own
    sampling and decoding): the same prompt ids and greedy tokens as the processor and `generate` on the file, which
    `chat(sampling=False)` answers with too."""
    model = AutoModelForCausalLM.from_pretrained(ROOT / "demo_model", trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(ROOT / "demo_model", trust_remote_code=True)
    question, eos = "What colour is the shape?", processor.tokenizer.eos_token_id
    for path, shape in video_clips(tmp_path):
        content = [{"type": "video", "path": str(path)}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        expected = [t for t in output[0, inputs["input_ids"].shape[1]:].tolist() if t != eos]
        mime = "video/webm" if path.suffix == ".webm" else "video/mp4"
        url = f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
        for source in (url, path.as_uri()):
            content = [{"type": "video_url", "video_url": {"url": source}}, {"type": "text", "text": question}]
            result = demo_engine.chat([{"role": "user", "content": content}], greedy(demo_engine))[0]
            assert result.prompt_token_ids == inputs["input_ids"][0].tolist(), path.name
            assert [t for t in result.outputs[0].token_ids if t != eos] == expected, path.name
        chat = model.chat(msgs=[{"role": "user", "content": [path, question]}], sampling=False,
                          max_new_tokens=MAX_TOKENS)
        assert processor.decode(expected) == chat == shape.colour
