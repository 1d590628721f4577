"""Video from a file to an answer: the video processor (MiniCPM-V's sampling, only the kept frames decoded, each frame
bit-exact to the image processor), the token budget, and the demo model answering about a clip through `chat()`, the
processor + `generate` and the CLI. Clips are made here with PyAV: H.264 in mp4, VP9 in WebM, an animated GIF, odd
sizes, 1 s to 3 min (and 10 hours of tiny frames)."""

import random

import av
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from omnilmm_tools import clips
from omnilmm_tools.remote import DEMO_MODEL, remote_module

video_processing = remote_module("video_processing_omnilmm")
QUESTION = "What colour is the shape?"


def moving_frames(count, width, height, seed=0):
    """Frames that all differ (noise, a moving bar): a decoder that returned the wrong frame would be caught."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    frames = []
    for i in range(count):
        frame = np.roll(base, i, axis=1)
        frame[:, (3 * i) % width] = (255, i % 256, 0)
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {
        "h264-mp4": clips.write_video(folder / "b-frames.mp4", moving_frames(150, 322, 186), 25, gop=12),
        "vp9-webm": clips.write_video(folder / "odd.webm", moving_frames(50, 161, 97, seed=1), 10, gop=8),
        "gif": clips.write_video(folder / "anim.gif", moving_frames(24, 97, 61, seed=2), 8),
        "one-second": clips.write_video(folder / "one-second.mp4", moving_frames(30, 64, 48, seed=3), 30),
        "three-minutes": clips.write_video(folder / "three-minutes.mp4", moving_frames(1800, 64, 48, seed=4), 10,
                                           gop=10, preset="ultrafast"),
    }


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(DEMO_MODEL, trust_remote_code=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True, dtype=torch.float32).eval()


def minicpm_v_recipe(path, max_num_frames=64):
    """MiniCPM-V's `encode_video` (its model card's recipe, with PyAV in place of decord): decode every frame,
    `sample_fps = round(avg_fps / 1)`, every `sample_fps`-th frame, then `uniform_sample` down to MAX_NUM_FRAMES."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        avg_fps = float(stream.average_rate)

    def uniform_sample(items, n):
        gap = len(items) / n
        idxs = [int(i * gap + gap / 2) for i in range(n)]
        return [items[i] for i in idxs]

    sample_fps = round(avg_fps / 1)
    frame_idx = [i for i in range(0, len(frames), sample_fps)]
    if len(frame_idx) > max_num_frames:
        frame_idx = uniform_sample(frame_idx, max_num_frames)
    return frame_idx, [frames[i] for i in frame_idx]


@pytest.mark.parametrize("name", ["h264-mp4", "vp9-webm", "gif", "one-second", "three-minutes"])
def test_sampled_frames_are_minicpm_v_recipe_bit_for_bit(clip_files, processor, name):
    indices, expected = minicpm_v_recipe(clip_files[name])
    frames, metadata = processor.video_processor.load(str(clip_files[name]))
    assert metadata.frames_indices == indices
    assert len(frames) == len(expected) and all(np.array_equal(a, b) for a, b in zip(frames, expected))


def test_only_the_kept_frames_are_decoded(clip_files, processor):
    # 3 minutes at 10 fps, a keyframe every 10 frames: 64 kept frames need at most 64 groups of 10 decoded
    with clips.count_decoded_frames() as decoded:
        frames, _ = processor.video_processor.load(str(clip_files["three-minutes"]))
    assert len(frames) == 64 and decoded[0] <= 64 * 10 < 1800


def test_a_ten_hour_video_is_sampled_and_decoded_in_bounded_work(tmp_path, processor):
    frames = moving_frames(36_000, 16, 16)  # 10 hours at 1 frame per second
    path = clips.write_video(tmp_path / "ten-hours.mp4", frames, 1, gop=60, preset="ultrafast")
    with clips.count_decoded_frames() as decoded:
        sampled, metadata = processor.video_processor.load(str(path))
    assert metadata.total_num_frames == 36_000 and len(sampled) == 64
    assert metadata.frames_indices == video_processing.sample_frame_indices(36_000, 1.0)
    assert decoded[0] <= 64 * 60


def test_video_frames_are_bit_exact_to_the_image_processor(clip_files, processor):
    _, frames = minicpm_v_recipe(clip_files["h264-mp4"])  # 6 frames of 322 x 186: sliced, as images would be
    video = processor(text="<video>\nWhat happens?", videos=str(clip_files["h264-mp4"]))
    images = processor.image_processor([frames])
    assert len(video["pixel_values"][0]) == len(images["pixel_values"][0]) > len(frames)
    assert all(torch.equal(a, b) for a, b in zip(video["pixel_values"][0], images["pixel_values"][0]))
    assert video["slice_grids"][0] == images["slice_grids"][0]


def test_more_than_sixteen_frames_are_unsliced_and_counted_without_pixels(clip_files, processor):
    for name, sliced, options in (("three-minutes", False, {}), ("h264-mp4", True, {}),
                                  ("h264-mp4", False, {"max_sliced_frames": 0})):
        out = processor(text="A video: <video>", videos=str(clip_files[name]), return_mm_token_type_ids=True,
                        **options)
        frames = len(out["slice_grids"][0])
        assert all((grid is not None) == sliced for grid in out["slice_grids"][0])
        width, height = out["image_sizes"][0][0]
        counted = processor._get_num_multimodal_tokens(video_sizes=[(frames, height, width)], **options)
        counted = counted["num_video_tokens"]
        assert counted == [int((out["mm_token_type_ids"][0] == 2).sum())]


def test_the_context_caps_the_frames_or_refuses_with_the_numbers(clip_files, processor):
    capped = type(processor)(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                             video_processor=processor.video_processor, num_query=processor.num_query,
                             max_position_embeddings=600)
    out = capped(text="<video>\nWhat happens?", videos=str(clip_files["three-minutes"]))
    frames = len(out["slice_grids"][0])
    assert 1 < frames < 64 and out["input_ids"].shape[1] <= 600  # as many frames as fit, not the 64 asked for
    with pytest.raises(ValueError, match=r"num_frames=64 frames take at least .* lower num_frames"):
        capped(text="<video>", videos=str(clip_files["three-minutes"]), num_frames=64)
    with pytest.raises(ValueError, match="leaves no room for its 1 video"):
        capped(text="word " * 600 + "<video>", videos=str(clip_files["one-second"]))


def test_sampling_settings_fps_num_frames_and_max_num_frames(clip_files, processor):
    path, total = str(clip_files["h264-mp4"]), 150  # 6 s at 25 fps
    centred = [int(i * total / 4 + total / 8) for i in range(4)]  # uniform_sample's share midpoints
    assert processor.video_processor.load(path, fps=2)[1].frames_indices == list(range(0, total, round(25 / 2)))
    assert processor.video_processor.load(path, num_frames=4)[1].frames_indices == centred
    assert processor.video_processor.load(path, fps=25, max_num_frames=4)[1].frames_indices == centred


def shape_clip(folder, seed, suffix=".mp4"):
    frames, shape = clips.shape_frames(random.Random(seed), seconds=4, fps=8)
    return clips.write_video(folder / f"shape-{seed}{suffix}", frames, 8), shape


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_demo_model_names_the_colour_in_a_clip_every_way(tmp_path, model, processor, seed, capsys):
    path, shape = shape_clip(tmp_path, seed, ".webm" if seed == 2 else ".mp4")
    by_path = model.chat(msgs=[{"role": "user", "content": [{"type": "video", "video": str(path)}, QUESTION]}],
                         sampling=False)
    assert by_path == shape.colour
    assert model.chat(msgs=[{"role": "user", "content": [path, QUESTION]}], sampling=False) == by_path  # a Path
    content = [{"type": "video", "path": str(path)}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    assert processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == by_path
    from omnilmm_tools import chat_cli

    chat_cli.main(["--video", str(path), QUESTION])
    assert capsys.readouterr().out.strip() == by_path


def test_a_second_turn_about_a_video_reuses_its_frames_and_answers_like_a_fresh_model(tmp_path, model):
    path, shape = shape_clip(tmp_path, 3)
    first = [{"role": "user", "content": [{"type": "video", "video": str(path)}, QUESTION]}]
    model.clear_chat_cache()
    answer = model.chat(msgs=first, sampling=False)
    follow_up = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "What shape is it?"}]
    with clips.count_decoded_frames() as decoded:
        second = model.chat(msgs=follow_up, sampling=False)
    assert decoded[0] == 0  # neither decoded nor encoded again
    model.clear_chat_cache()
    assert model.chat(msgs=follow_up, sampling=False) == second
    assert (answer, second) == (shape.colour, shape.kind)


def test_get_image_features_returns_the_vision_towers_states(model):
    pixels = torch.randn(2, 3, 224, 224)
    out = model.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
    depth, tower = len(model.model.vision_tower.blocks), model.model.vision_tower
    assert len(out.hidden_states) == depth + 1 and len(out.attentions) == depth
    assert out.last_hidden_state.shape == (2, 1 + 16 * 16, tower.embed_dim)
    torch.testing.assert_close(tower.norm(out.hidden_states[-1]), out.last_hidden_state)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, tower.blocks[0].attn.num_heads, 257))
    torch.testing.assert_close(out.pooler_output, model.get_image_features(pixels).pooler_output, atol=1e-4, rtol=0)


def test_an_http_url_reads_as_the_file(clip_files, processor):
    import functools
    import http.server
    import threading

    folder = clip_files["vp9-webm"].parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback: no network needed
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        by_url, by_file = (processor.video_processor.load(source) for source in
                           (f"{base}/odd.webm", str(clip_files["vp9-webm"])))
        assert by_url[1].frames_indices == by_file[1].frames_indices
        assert all(np.array_equal(a, b) for a, b in zip(by_url[0], by_file[0]))
        with pytest.raises(ValueError, match="Could not download the video at .*404"):
            processor.video_processor.load(f"{base}/missing.mp4")
    finally:
        server.shutdown()
