"""Bad input, untrusted files, offline safety and dtypes: what a user or a downloaded file can throw at every entry
point (image processor, processor, model, chat(), omnilmm-convert, the fine-tuning data) gets a clear
ValueError/TypeError (FileNotFoundError/FileExistsError for paths) that names the problem, never a crash from deep
inside, a hang, code execution or an answer about the wrong image.

A tiny random model (4 query tokens, 112 px images) with the real Mistral v0.1 tokenizer serves the model and chat
cases; the converter cases use copies of the tiny original-format fixture with one thing broken each.
"""

import ast
import copy
import io
import json
import os
import pickle
import shutil
import socket
import struct
import sys
import zlib
from functools import cached_property
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from conftest import TINY, make_tiny_model_folder
from omnilmm_tools import clips
from omnilmm_tools.convert import convert
from omnilmm_tools.remote import REMOTE_CODE_FILES, ROOT, remote_module

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

ip = remote_module("image_processing_omnilmm")
NUM_QUERY = 4
IMAGE_SIZE = 112
PATCH, START, END = 32000, 32001, 32002
SPAN = [START] + [PATCH] * NUM_QUERY + [END]
DELETE = object()  # config value that removes the key


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    return make_tiny_model_folder(
        tmp_path_factory.mktemp("bad-inputs") / "tiny", tokenizer, num_query=NUM_QUERY, image_size=IMAGE_SIZE
    )


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def png_bytes(width, height, idat=b"\x78\x9c\x03\x00\x00\x00\x00\x01"):
    """A PNG whose header declares `width x height` RGB pixels, followed by (almost) no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(image_format, size=(64, 48)):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, image_format)
    return buffer.getvalue()


def corrupt_png():
    data = bytearray(encoded("PNG"))
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(40)  # the header is fine, the compressed pixels are not
    return bytes(data)


def closed_image(env):
    with Image.open(env.file("ok.png", encoded("PNG"))) as image:
        pass  # a lazily opened image used after its `with` block
    return image


def photo(width=40, height=30):
    return Image.new("RGB", (width, height), (120, 30, 200))


def ids(*parts):
    """A (1, L) prompt: BOS, then lists of text ids and "img" for one image span."""
    tokens = [1]
    for part in parts:
        tokens += SPAN if part == "img" else list(part)
    return torch.tensor([tokens])


def pixels(n=1):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE)


def user(content):
    return [{"role": "user", "content": content}]


class Env:
    """What a case needs, built on first use: the shared tiny model and processor, files in a fresh folder."""

    def __init__(self, request, tmp_path):
        self.request, self.tmp = request, tmp_path

    @cached_property
    def model(self):
        return self.request.getfixturevalue("model")

    @cached_property
    def processor(self):
        return self.request.getfixturevalue("processor")

    def file(self, name, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def clip(self, name="clip.mp4", frames=12, size=(64, 48), **options) -> Path:
        """A short clip of distinct noise frames (PyAV), written to `name`."""
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(frames)]
        return clips.write_video(self.tmp / name, images, 4, **options)

    def truncated_clip(self) -> Path:
        """A clip whose index comes first (`faststart`) and whose last third is missing."""
        data = self.clip("whole.mp4", movflags="faststart").read_bytes()
        return self.file("truncated.mp4", data[: len(data) * 2 // 3])

    def audio_only(self) -> Path:
        with av.open(str(self.tmp / "audio.m4a"), "w") as container:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in [*stream.encode(frame), *stream.encode()]:
                container.mux(packet)
        return self.tmp / "audio.m4a"

    def no_frames(self) -> Path:
        with av.open(str(self.tmp / "empty.mkv"), "w") as container:
            stream = container.add_stream("libx264", rate=4)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            container.start_encoding()
        return self.tmp / "empty.mkv"

    def unknown_codec(self) -> Path:
        """An AVI whose video codec (fourcc `QQZZ`) no FFmpeg decoder knows."""
        data = self.clip("mpeg4.avi").read_bytes()
        return self.file("unknown.avi", data.replace(b"FMP4", b"QQZZ"))

    def original(self, config=None, config_text=None, state_dict=None, added_tokens=None, drop=()) -> Path:
        """A copy of the tiny original-format folder with `config` keys changed (DELETE removes one), or
        `config_text` as config.json, `state_dict(sd)` applied to the weights, `added_tokens` as added_tokens.json
        text, and the files of `drop` removed."""
        src = self.tmp / "original"
        src.mkdir()
        for path in (TINY / "original").iterdir():
            if path.name not in drop:
                shutil.copyfile(path, src / path.name)  # copyfile: the fixture files are read-only
        if config is not None:
            values = json.loads((src / "config.json").read_text())
            values.update(config)
            values = {key: value for key, value in values.items() if value is not DELETE}
            (src / "config.json").write_text(json.dumps(values))
        if config_text is not None:
            (src / "config.json").write_bytes(config_text if isinstance(config_text, bytes) else config_text.encode())
        if state_dict is not None:
            weights = torch.load(src / "pytorch_model.bin", weights_only=True)
            weights = state_dict(weights) or weights
            torch.save(weights, src / "pytorch_model.bin")
        if added_tokens is not None:
            (src / "added_tokens.json").write_text(added_tokens)
        return src

    def convert(self, **original):
        return convert(self.original(**original), self.tmp / "converted")


def with_key(key, value):
    def change(weights):
        weights[key] = value

    return change


def without_key(key):
    def change(weights):
        del weights[key]

    return change


def sample(**overrides):
    """A valid fine-tuning sample (SPEC 9) with some fields replaced (None removes one)."""
    base = {
        "id": "s1",
        "image": "a.png",
        "conversations": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}],
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def parse(env, data):
    from omnilmm_tools import finetune

    photo().save(env.tmp / "a.png")
    return finetune.parse_sample(data, env.tmp)


def dataset(env, data, raw=False, corrupt_image=False):
    from omnilmm_tools import finetune

    if corrupt_image:
        env.file("a.png", encoded("PNG")[:60])
    else:
        photo().save(env.tmp / "a.png")
    path = env.file("train.json", data if raw else json.dumps(data).encode())
    built = finetune.SupervisedDataset(path, env.processor)
    return built.example(0)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The catalogue: (entry point, call, exception, message fragment), one readable id each
# ---------------------------------------------------------------------------------------------------------------------

S = ip.OmniLMMImageProcessor  # shorthand for the image processor class

IMAGE_PROCESSOR_CASES = [
    ("max_slice_nums-0", lambda e: S(slice_mode=True)(photo(), max_slice_nums=0), ValueError, "max_slice_nums must be an integer >= 1"),
    ("max_slice_nums-negative", lambda e: S(slice_mode=True)(photo(), max_slice_nums=-3), ValueError, "max_slice_nums must be an integer >= 1"),
    ("max_slice_nums-float", lambda e: S(slice_mode=True)(photo(), max_slice_nums=2.5), ValueError, "max_slice_nums must be an integer >= 1"),
    ("max_slice_nums-string", lambda e: S(max_slice_nums="9"), ValueError, "max_slice_nums must be an integer >= 1"),
    ("slice_layout-max_slice_nums-0", lambda e: ip.slice_layout((900, 900), max_slice_nums=0), ValueError, "max_slice_nums"),
    ("slice_layout-zero-width", lambda e: ip.slice_layout((0, 5)), ValueError, "positive integer width"),
    ("slice_layout-not-a-pair", lambda e: ip.slice_layout(5), TypeError, "image_size = (width, height)"),
    ("slice_layout-three-values", lambda e: ip.slice_layout((5, 5, 5)), TypeError, "image_size = (width, height)"),
    ("image_size-0", lambda e: S()(photo(), image_size=0), ValueError, "image_size must be a positive integer"),
    ("image_size-negative-at-init", lambda e: S(image_size=-5), ValueError, "image_size must be a positive integer"),
    ("image_std-zero", lambda e: S(image_std=(0, 0, 0)), ValueError, "std non-zero"),
    ("image_mean-two-values", lambda e: S()(photo(), image_mean=[0.5, 0.5]), ValueError, "must be 3 numbers"),
    ("return_tensors-tf", lambda e: S()(photo(), return_tensors="tf"), ValueError, "return_tensors must be None, 'pt' or 'np'"),
    ("huge-declared-size-file", lambda e: S()(e.file("big.png", png_bytes(12000, 9000))), ValueError, "more than max_image_pixels"),
    ("decompression-bomb-file", lambda e: S()(e.file("bomb.png", png_bytes(30000, 30000))), ValueError, "PIL refused to open"),
    ("huge-lazy-PIL-image", lambda e: S()(Image.open(e.file("big.png", png_bytes(12000, 9000)))), ValueError, "more than max_image_pixels"),
    ("over-max_image_pixels", lambda e: S(max_image_pixels=1000)(photo(40, 30)), ValueError, "more than max_image_pixels=1,000"),
    ("PIL-image-of-a-truncated-file", lambda e: S()(Image.open(e.file("cut.png", encoded("PNG")[:300]))), ValueError, "Could not decode"),
    ("PIL-image-whose-file-was-closed", lambda e: S()(closed_image(e)), ValueError, "its file closed"),
    ("empty-file", lambda e: S()(e.file("empty.png", b"")), ValueError, "empty or not an image"),
    ("header-only-png", lambda e: S()(e.file("header.png", png_bytes(64, 64))), ValueError, "truncated or corrupt"),
    ("truncated-png", lambda e: S()(e.file("cut.png", encoded("PNG")[:300])), ValueError, "truncated or corrupt"),
    ("truncated-jpeg", lambda e: S()(e.file("cut.jpg", encoded("JPEG")[:-600])), ValueError, "truncated or corrupt"),
    ("corrupt-png-data", lambda e: S()(e.file("bad.png", corrupt_png())), ValueError, "truncated or corrupt"),
    ("text-file-named-jpg", lambda e: S()(e.file("notes.jpg", b"hello, world")), ValueError, "empty or not an image"),
    ("missing-file", lambda e: S()(e.tmp / "missing.png"), FileNotFoundError, "No image file at"),
    ("directory-as-image", lambda e: S()(e.tmp), FileNotFoundError, "No image file at"),
    ("url-is-not-fetched", lambda e: S()("https://example.com/cat.png"), FileNotFoundError, "URLs are not fetched"),
    ("int-as-image", lambda e: S()(5), TypeError, "Expected an image"),
    ("bytes-as-image", lambda e: S()(encoded("PNG")), TypeError, "Expected an image"),
    ("array-with-5-channels", lambda e: S()(np.zeros((8, 8, 5), np.uint8)), ValueError, "1, 3 or 4 channels"),
    ("float-array-above-1", lambda e: S()(np.full((8, 8, 3), 3.0)), ValueError, "values in [0, 1]"),
    ("nan-float-array", lambda e: S()(np.full((8, 8, 3), np.nan, np.float32)), ValueError, "values in [0, 1]"),
    ("negative-int16-array", lambda e: S()(np.full((8, 8, 3), -3, np.int16)), ValueError, "values in [0, 255]"),
    ("complex-array", lambda e: S()(np.zeros((8, 8, 3), np.complex64)), TypeError, "Unsupported image array dtype"),
    ("one-dimensional-array", lambda e: S()(np.zeros(8, np.uint8)), ValueError, "expected 2 or 3 dims"),
    ("zero-size-array", lambda e: S()(np.zeros((0, 8, 3), np.uint8)), ValueError, "zero size"),
    ("images-and-lists-mixed", lambda e: S()([photo(), [photo()]]), ValueError, "not a mix"),
    ("thin-strip-in-slice-mode", lambda e: S(slice_mode=True)(Image.new("L", (2, 5000))), ValueError, "thinner than 1:1000"),
]

PROCESSOR_CASES = [
    ("text-int", lambda e: e.processor(text=5), TypeError, "`text` must be a string or a list of strings"),
    ("text-list-with-None", lambda e: e.processor(text=["a", None]), TypeError, "`text` must be a string or a list of strings"),
    ("text-bytes", lambda e: e.processor(text=b"What is this?"), TypeError, "`text` must be a string"),
    ("text-empty-list", lambda e: e.processor(text=[]), ValueError, "`text` is an empty list"),
    ("no-text-no-images", lambda e: e.processor(), ValueError, "needs `text` and/or `images`"),
    ("two-placeholders-one-image", lambda e: e.processor(text="<image><image>Compare.", images=photo()), ValueError, "2 <image> placeholder(s)"),
    ("image-without-placeholder", lambda e: e.processor(text="Describe.", images=photo()), ValueError, "0 <image> placeholder(s)"),
    ("placeholder-without-image", lambda e: e.processor(text="<image>Describe."), ValueError, "no images were given"),
    ("images-not-images", lambda e: e.processor(text="<image>", images=5), TypeError, "Expected an image"),
    ("image-lists-for-fewer-prompts", lambda e: e.processor(text=["<image>", "<image>"], images=[[photo()]]), ValueError, "1 lists (one per prompt) but there are 2 prompts"),
    ("image-list-short-for-a-prompt", lambda e: e.processor(text=["<image><image>", "x"], images=[[photo()], []]), ValueError, "Prompt 0 has 2 <image> placeholder(s) but 1 images"),
    ("literal-image-tokens-in-text", lambda e: e.processor(text="<im_start><im_patch><im_end> hi"), ValueError, "write images as <image> placeholders"),
    ("truncation-cuts-an-image-span", lambda e: e.processor(text="Hello there <image> and more", images=photo(), truncation=True, max_length=5), ValueError, "would cut through the image spans"),
    ("truncation-max_length-negative", lambda e: e.processor(text="Hello there", truncation=True, max_length=-1), ValueError, "max_length must be a positive integer"),
    ("truncation-max_length-string", lambda e: e.processor(text="Hello there", truncation=True, max_length="5"), ValueError, "max_length must be a positive integer"),
    ("max_slice_nums-0", lambda e: e.processor(text="<image>", images=photo(), max_slice_nums=0), ValueError, "max_slice_nums must be an integer >= 1"),
    ("video-without-placeholder", lambda e: e.processor(text="Describe.", videos=[[photo(), photo()]]), ValueError, "0 <video> placeholder(s)"),
    ("missing-image-path", lambda e: e.processor(text="<image>", images=str(e.tmp / "nope.png")), FileNotFoundError, "No image file at"),
    ("corrupt-image-file", lambda e: e.processor(text="<image>", images=str(e.file("x.png", b"\x89PNG garbage"))), ValueError, "empty or not an image"),
    ("num_query-0", lambda e: type(e.processor)(image_processor=e.processor.image_processor, tokenizer=e.processor.tokenizer, num_query=0), ValueError, "num_query must be a positive integer"),
]

TWO_ROWS = torch.tensor([[1, 5] + SPAN + SPAN, [1] + [5] * (1 + 2 * len(SPAN))])  # 2 spans, then 0 spans

def without_pyav(e):
    clip = str(e.clip())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
        e.processor(text="<video>", videos=clip)


VIDEO_CASES = [
    ("not-a-video", lambda e: e.processor(text="<video>", videos=str(e.file("notes.mp4", b"just some text"))), ValueError, "not a video file, or truncated or corrupt"),
    ("truncated-mp4", lambda e: e.processor(text="<video>", videos=str(e.file("cut.mp4", e.clip().read_bytes()[:800]))), ValueError, "not a video file, or truncated or corrupt"),
    ("truncated-faststart-mp4", lambda e: e.processor(text="<video>", videos=str(e.truncated_clip())), ValueError, "truncated or corrupt"),
    ("no-frames", lambda e: e.processor(text="<video>", videos=str(e.no_frames())), ValueError, "holds no video frames"),
    ("no-video-stream", lambda e: e.processor(text="<video>", videos=str(e.audio_only())), ValueError, "has no video stream"),
    ("unknown-codec", lambda e: e.processor(text="<video>", videos=str(e.unknown_codec())), ValueError, "a codec this PyAV build cannot decode"),
    ("frames-over-the-pixel-limit", lambda e: e.processor(text="<video>", videos=str(e.clip()), max_image_pixels=1000), ValueError, "more than max_image_pixels=1,000"),
    ("fps-0", lambda e: e.processor(text="<video>", videos=str(e.clip()), fps=0), ValueError, "fps must be a positive number"),
    ("fps-negative", lambda e: e.processor.video_processor(str(e.clip()), fps=-1), ValueError, "fps must be a positive number"),
    ("num_frames-more-than-the-video", lambda e: e.processor(text="<video>", videos=str(e.clip()), num_frames=50), ValueError, "num_frames=50 is more than the video's 12 frames"),
    ("num_frames-more-than-the-context", lambda e: e.processor(text="<video>", videos=str(e.clip()), num_frames=11, truncation=True, max_length=40), ValueError, "num_frames=11 frames take at least 66 tokens"),
    ("max_num_frames-0", lambda e: e.processor(text="<video>", videos=str(e.clip()), max_num_frames=0), ValueError, "max_num_frames must be a positive integer"),
    ("a-video-given-as-an-image", lambda e: e.processor(text="<image>", images=str(e.clip())), ValueError, "It looks like a video: give it as a video"),
    ("an-image-given-as-a-video", lambda e: e.processor(text="<video>", videos=str(e.file("photo.png", encoded("PNG")))), ValueError, "is an image (png), not a video"),
    ("an-empty-list-of-frames", lambda e: e.processor.video_processor([[]]), ValueError, "a non-empty list of frames"),
    ("missing-video-file", lambda e: e.processor(text="<video>", videos=str(e.tmp / "nope.mp4")), FileNotFoundError, "No video file at"),
    ("without-pyav", without_pyav, ImportError, "pip install av"),
    ("chat-a-video-as-an-image-part", lambda e: e.model.chat(msgs=user([{"type": "image", "image": str(e.clip())}, "What?"])), ValueError, "It looks like a video"),
]

MODEL_CASES = [
    ("pixel_values-rank-3", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=torch.zeros(3, 112, 112)), ValueError, "(num_images, 3, height, width)"),
    ("pixel_values-4-channels", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=torch.zeros(1, 4, 112, 112)), ValueError, "(num_images, 3, height, width)"),
    ("pixel_values-rank-5", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=torch.zeros(1, 1, 3, 112, 112)), ValueError, "(num_images, 3, height, width)"),
    ("pixel_values-numpy", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=np.zeros((1, 3, 112, 112), np.float32)), TypeError, "pixel_values must be a tensor or a list"),
    ("pixel_values-list-of-paths", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=[["cat.png"]]), TypeError, "must hold (3, height, width) tensors"),
    ("pixel_values-one-channel-in-list", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=[[torch.zeros(1, 112, 112)]]), ValueError, "(3, height, width) tensor"),
    ("pixel_values-uint8-unnormalised", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=torch.zeros(1, 3, 112, 112, dtype=torch.uint8)), TypeError, "normalised float images"),
    ("pixel_values-per-sample-mismatch", lambda e: e.model(input_ids=TWO_ROWS, pixel_values=[[pixels()[0]], [pixels()[0]]]), ValueError, "the samples have [2, 0] image spans but pixel_values holds [1, 1]"),
    ("pixel_values-more-lists-than-samples", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=[[pixels()[0]], []]), ValueError, "holds [1, 0] images per sample"),
    ("pixel_values-empty-with-a-span", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=torch.zeros(0, 3, 112, 112)), ValueError, "1 image spans but 0 images"),
    ("more-spans-than-images", lambda e: e.model(input_ids=ids([5], "img", [6], "img"), pixel_values=pixels(1)), ValueError, "2 image spans but 1 images"),
    ("more-images-than-spans", lambda e: e.model(input_ids=ids([5], "img"), pixel_values=pixels(2)), ValueError, "1 image spans but 2 images"),
    ("span-too-short", lambda e: e.model(input_ids=ids([5, START] + [PATCH] * (NUM_QUERY - 1) + [END]), pixel_values=pixels(1)), ValueError, f"need {NUM_QUERY} <im_patch> tokens"),
    ("unmatched-im_start", lambda e: e.model(input_ids=ids([5, START] + [PATCH] * NUM_QUERY + [6]), pixel_values=pixels(1)), ValueError, "1 <im_start> but 0 <im_end>"),
    ("span-interleaved", lambda e: e.model(input_ids=ids([5] + [PATCH] * NUM_QUERY + [END, START]), pixel_values=pixels(1)), ValueError, "cut or interleaved"),
    ("span-without-images", lambda e: e.model(input_ids=ids([5], "img")), ValueError, "no pixel_values or vision_hidden_states"),
    ("vision_hidden_states-wrong-hidden", lambda e: e.model(input_ids=ids([5], "img"), vision_hidden_states=torch.zeros(1, NUM_QUERY, 99)), ValueError, "image features must have the shape (num_images, 4, 128)"),
    ("vision_hidden_states-2d", lambda e: e.model(input_ids=ids([5], "img"), vision_hidden_states=torch.zeros(NUM_QUERY, 128)), ValueError, "image features must have the shape"),
    ("vision_hidden_states-wrong-count", lambda e: e.model(input_ids=ids([5], "img"), vision_hidden_states=torch.zeros(2, NUM_QUERY, 128)), ValueError, "1 image spans but 2 images"),
    ("vision_hidden_states-numpy", lambda e: e.model(input_ids=ids([5], "img"), vision_hidden_states=np.zeros((1, NUM_QUERY, 128))), TypeError, "vision_hidden_states must be a tensor"),
    ("vision_hidden_states-list-of-str", lambda e: e.model(input_ids=ids([5], "img"), vision_hidden_states=["features"]), TypeError, "vision_hidden_states must be a tensor"),
    ("input_ids-outside-vocabulary", lambda e: e.model(input_ids=torch.tensor([[1, 40000]])), ValueError, "outside the vocabulary of 32009 tokens"),
    ("input_ids-negative", lambda e: e.model(input_ids=torch.tensor([[1, -3]])), ValueError, "outside the vocabulary"),
    ("input_ids-float", lambda e: e.model(input_ids=torch.tensor([[1.0, 5.0]])), TypeError, "input_ids must be a torch.long tensor"),
    ("input_ids-1d", lambda e: e.model(input_ids=torch.tensor([1, 5, 6])), ValueError, "(batch, length) tensor, got shape (3,)"),
    ("input_ids-3d", lambda e: e.model(input_ids=torch.tensor([[[1, 5, 6]]])), ValueError, "(batch, length) tensor, got shape (1, 1, 3)"),
    ("input_ids-python-list", lambda e: e.model(input_ids=[[1, 5, 6]]), TypeError, "input_ids must be a torch.long tensor"),
    ("no-input", lambda e: e.model(), ValueError, "give `input_ids`"),
    ("inputs_embeds-without-image-positions", lambda e: e.model(inputs_embeds=torch.zeros(1, 3, 128), pixel_values=pixels(1)), ValueError, "0 image spans but 1 images"),
    ("ids-and-inputs_embeds", lambda e: e.model(input_ids=ids([5]), inputs_embeds=torch.zeros(1, 2, 128)), ValueError, "exactly one of them"),
    ("labels-wrong-length", lambda e: e.model(input_ids=torch.tensor([[1, 5, 6]]), labels=torch.ones(1, 5, dtype=torch.long)), ValueError, "to match target batch_size"),
    ("generate-outside-vocabulary", lambda e: e.model.generate(torch.tensor([[1, 40000]]), max_new_tokens=2, do_sample=False), ValueError, "outside the vocabulary"),
    ("generate-per-sample-mismatch", lambda e: e.model.generate(TWO_ROWS, pixel_values=[[pixels()[0]], [pixels()[0]]], max_new_tokens=2), ValueError, "image spans but pixel_values holds"),
]


def fresh_model_without_folder(env):
    config = copy.deepcopy(env.model.config)
    config._name_or_path = ""
    return type(env.model)(config)


def other_processor(env, **kwargs):
    return type(env.processor)(image_processor=env.processor.image_processor, tokenizer=env.processor.tokenizer, **kwargs)


CHAT_CASES = [
    ("msgs-a-string", lambda e: e.model.chat(msgs="What is this?"), ValueError, "msgs must be a non-empty list"),
    ("msgs-a-dict", lambda e: e.model.chat(msgs={"role": "user", "content": "hi"}), ValueError, "msgs must be a non-empty list"),
    ("msgs-empty", lambda e: e.model.chat(msgs=[]), ValueError, "msgs must be a non-empty list"),
    ("msgs-missing", lambda e: e.model.chat(image=photo()), ValueError, "msgs must be a non-empty list"),
    ("msgs-list-of-strings", lambda e: e.model.chat(msgs=["hi"]), ValueError, "msgs must be a non-empty list"),
    ("role-unknown", lambda e: e.model.chat(msgs=[{"role": "bot", "content": "hi"}]), ValueError, "needs a role (system, user or assistant)"),
    ("role-missing", lambda e: e.model.chat(msgs=[{"content": "hi"}]), ValueError, "needs a role"),
    ("content-missing", lambda e: e.model.chat(msgs=[{"role": "user"}]), ValueError, "and a content"),
    ("content-int", lambda e: e.model.chat(msgs=user(5)), TypeError, "content must be a string or a list of images and strings"),
    ("content-None", lambda e: e.model.chat(msgs=user(None)), TypeError, "content must be a string or a list"),
    ("content-list-with-int", lambda e: e.model.chat(msgs=user([5, "What?"])), TypeError, "Expected an image"),
    ("content-text-part-without-text", lambda e: e.model.chat(msgs=user([{"type": "text"}])), TypeError, "needs a string 'text'"),
    ("content-image-part-without-image", lambda e: e.model.chat(msgs=user([{"type": "image"}])), TypeError, "cannot read an image, a video or a text"),
    ("image-but-no-user-message", lambda e: e.model.chat(image=photo(), msgs=[{"role": "assistant", "content": "hi"}]), ValueError, "msgs has no user message"),
    ("image-path-that-is-missing", lambda e: e.model.chat(image=str(e.tmp / "nope.png"), msgs=user("What?")), FileNotFoundError, "No image file at"),
    ("image-not-an-image", lambda e: e.model.chat(image=5, msgs=user("What?")), TypeError, "Expected an image"),
    ("stream-with-a-batch", lambda e: e.model.chat(msgs=[user("a"), user("b")], stream=True), ValueError, "stream=True answers one conversation"),
    ("batch-with-fewer-images", lambda e: e.model.chat(image=[photo()], msgs=[user("a"), user("b")]), ValueError, "2 conversations but 1 entries in `image`"),
    ("batch-with-one-image-not-a-list", lambda e: e.model.chat(image=photo(), msgs=[user("a"), user("b")]), TypeError, "`image` must be a list"),
    ("batch-with-an-empty-conversation", lambda e: e.model.chat(msgs=[user("a"), []]), ValueError, "msgs must be a non-empty list"),
    ("max_slice_nums-0", lambda e: e.model.chat(image=photo(), msgs=user("What?"), max_slice_nums=0), ValueError, "max_slice_nums must be an integer >= 1"),
    ("processor-not-a-processor", lambda e: e.model.chat(msgs=user("hi"), processor="processor"), TypeError, "processor must be the model's OmniLMMProcessor"),
    ("tokenizer-not-a-tokenizer", lambda e: e.model.chat(msgs=user("hi"), tokenizer="tokenizer"), TypeError, "tokenizer must be the model's tokenizer"),
    ("processor-for-another-num_query", lambda e: e.model.chat(image=photo(), msgs=user("What?"), processor=other_processor(e, num_query=9)), ValueError, "the processor does not fit this model"),
    ("unknown-generate-argument", lambda e: e.model.chat(msgs=user("hi"), max_new_tokens=2, no_such_argument=1), ValueError, "no_such_argument"),
    ("model-without-a-processor", lambda e: fresh_model_without_folder(e).chat(msgs=user("hi")), ValueError, "give `processor=`"),
]

CONVERTER_CASES = [
    ("missing-config.json", lambda e: e.convert(drop=("config.json",)), FileNotFoundError, "config.json is missing"),
    ("malformed-config-json", lambda e: e.convert(config_text='{"hidden_size": 256,'), ValueError, "config.json is not valid JSON"),
    ("binary-config", lambda e: e.convert(config_text=b"\xff\xfe\x00garbage"), ValueError, "config.json is not valid JSON"),
    ("config-a-list", lambda e: e.convert(config_text="[1, 2]"), ValueError, "must hold a JSON object"),
    ("num_query-a-string", lambda e: e.convert(config={"num_query": "abc"}), ValueError, "`num_query` must be a positive integer, got 'abc'"),
    ("num_query-not-square", lambda e: e.convert(config={"num_query": 10}), ValueError, "`num_query` must be a square number"),
    ("num_query-negative", lambda e: e.convert(config={"num_query": -4}), ValueError, "`num_query` must be a positive integer"),
    ("hidden_size-negative", lambda e: e.convert(config={"hidden_size": -256}), ValueError, "`hidden_size` must be a positive integer"),
    ("hidden_size-a-string", lambda e: e.convert(config={"hidden_size": "256"}), ValueError, "hidden_size"),
    ("hidden_size-below-one-resampler-head", lambda e: e.convert(config={"hidden_size": 100}), ValueError, "`hidden_size` must be at least 128"),
    ("image_size-a-string", lambda e: e.convert(config={"image_size": "big"}), ValueError, "`image_size` must be a positive integer"),
    ("vocab_size-a-string", lambda e: e.convert(config={"vocab_size": "many"}), ValueError, "vocab_size"),
    ("vision_tower_kwargs-a-list", lambda e: e.convert(config={"vision_tower_kwargs": [1, 2]}), ValueError, "`vision_tower_kwargs` must be a dict"),
    ("vision_tower-unknown", lambda e: e.convert(config={"mm_vision_tower": "no_such_model"}), ValueError, "does not build an OmniLMM model"),
    ("vision_tower_kwargs-unknown-argument", lambda e: e.convert(config={"vision_tower_kwargs": {"bogus": 1}}), ValueError, "does not build an OmniLMM model"),
    ("torch_dtype-unknown", lambda e: e.convert(config={"torch_dtype": "float99"}), ValueError, "is not a valid OmniLMM config"),
    ("mm_use_im_start_end-false", lambda e: e.convert(config={"mm_use_im_start_end": False}), ValueError, "set `mm_use_im_start_end=True`"),
    ("num_query-missing-so-default-256", lambda e: e.convert(config={"num_query": DELETE}), ValueError, "model.resampler.pos_embed has shape (64, 256)"),
    ("added_tokens-id-a-string", lambda e: e.convert(added_tokens='{"<im_patch>": "abc"}'), ValueError, "the id of <im_patch> must be an integer"),
    ("added_tokens-a-list", lambda e: e.convert(added_tokens="[1000]"), ValueError, "added_tokens.json must hold a JSON object"),
    ("added_tokens-negative-id", lambda e: e.convert(added_tokens='{"<im_patch>": -1, "<im_start>": 1001, "<im_end>": 1002}'), ValueError, "do not fit the vocabulary of 1009"),
    ("missing-pytorch_model.bin", lambda e: e.convert(drop=("pytorch_model.bin",)), FileNotFoundError, "has neither pytorch_model.bin"),
    ("tensor-of-wrong-shape", lambda e: e.convert(state_dict=with_key("lm_head.weight", torch.zeros(3, 3))), ValueError, "lm_head.weight has shape (3, 3)"),
    ("unexpected-key", lambda e: e.convert(state_dict=with_key("model.extra_head.weight", torch.zeros(2))), ValueError, "holds 'model.extra_head.weight', which the OmniLMM model"),
    ("missing-key", lambda e: e.convert(state_dict=without_key("lm_head.weight")), ValueError, "the checkpoint lacks 1 tensors, e.g. ['lm_head.weight']"),
    ("checkpoint-a-list-of-tensors", lambda e: e.convert(state_dict=lambda w: [torch.zeros(1)]), ValueError, "must hold a dict of tensors"),
    ("checkpoint-truncated", lambda e: convert(truncated_checkpoint(e), e.tmp / "converted"), ValueError, "is not a plain tensor checkpoint and was refused"),
    ("checkpoint-malicious-pickle", lambda e: convert(malicious_folder(e, e.tmp / "marker"), e.tmp / "converted"), ValueError, "is not a plain tensor checkpoint and was refused"),
    ("index-without-weight_map", lambda e: convert(index_folder(e, None), e.tmp / "converted"), ValueError, "must hold a 'weight_map'"),
    ("index-names-a-missing-part", lambda e: convert(index_folder(e, {"lm_head.weight": "part-1.bin"}), e.tmp / "converted"), FileNotFoundError, "missing: ['part-1.bin']"),
    ("index-names-a-file-outside", lambda e: convert(index_folder(e, {"lm_head.weight": "../../etc/passwd"}), e.tmp / "converted"), ValueError, "names files outside"),
    ("destination-not-empty", lambda e: convert(e.original(), non_empty(e)), FileExistsError, "exists and is not empty"),
    ("source-missing", lambda e: convert(e.tmp / "no-such-folder", e.tmp / "converted"), FileNotFoundError, "is not a folder"),
]


def truncated_checkpoint(env):
    src = env.original()
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    return src


def index_folder(env, weight_map):
    src = env.original(drop=("pytorch_model.bin",))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({} if weight_map is None else {"weight_map": weight_map}))
    return src


def non_empty(env):
    (env.tmp / "taken").mkdir()
    (env.tmp / "taken" / "keep.txt").write_text("mine")
    return env.tmp / "taken"


def config_folder(env, **changes):
    """A Hub folder holding only config.json (with `changes`) and the configuration code."""
    folder = env.request.getfixturevalue("folder")
    target = env.tmp / "hub"
    target.mkdir()
    shutil.copyfile(folder / "configuration_omnilmm.py", target / "configuration_omnilmm.py")
    values = json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**values, **changes}))
    return target


def auto_config(env, **changes):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config_folder(env, **changes), trust_remote_code=True)


C = remote_module("configuration_omnilmm").OmniLMMConfig

CONFIG_CASES = [
    ("hub-config-mm_use_im_start_end-false", lambda e: auto_config(e, mm_use_im_start_end=False), ValueError, "set `mm_use_im_start_end=True`"),
    ("hub-config-num_query-a-string", lambda e: auto_config(e, num_query="many"), ValueError, "`num_query` must be a positive integer"),
    ("num_query-not-square", lambda e: C(num_query=10), ValueError, "`num_query` must be a square number"),
    ("num_query-bool", lambda e: C(num_query=True), ValueError, "`num_query` must be a positive integer"),
    ("vision_batch_size-0", lambda e: C(vision_batch_size=0), ValueError, "`vision_batch_size` must be a positive integer"),
    ("hidden_size-64", lambda e: C(hidden_size=64), ValueError, "`hidden_size` must be at least 128"),
    ("mm_vision_tower-not-a-name", lambda e: C(mm_vision_tower=None), TypeError, "`mm_vision_tower` must be a timm model name"),
]

FINETUNE_CASES = [
    ("sample-not-an-object", lambda e: parse(e, ["not", "a", "sample"]), ValueError, "a sample must be a JSON object"),
    ("no-conversations", lambda e: parse(e, sample(conversations=None)), ValueError, "no 'conversations' list"),
    ("turn-with-bad-role", lambda e: parse(e, sample(conversations=[{"role": "robot", "content": "x"}])), ValueError, "a turn needs a role"),
    ("turn-content-not-a-string", lambda e: parse(e, sample(conversations=[{"role": "user", "content": 5}])), ValueError, "string content"),
    ("turns-not-alternating", lambda e: parse(e, sample(conversations=[{"role": "user", "content": "<image>"}] * 2)), ValueError, "turns must alternate"),
    ("ends-with-user", lambda e: parse(e, sample(conversations=[{"role": "user", "content": "<image> hi"}])), ValueError, "must end with an assistant turn"),
    ("two-placeholders-one-image", lambda e: parse(e, sample(conversations=[{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}])), ValueError, "2 image placeholders in the text but 1 images"),
    ("placeholder-in-assistant-turn", lambda e: parse(e, sample(conversations=[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "<image>"}])), ValueError, "assistant turn holds an image placeholder"),
    ("image-file-missing", lambda e: parse(e, sample(image="missing.png")), ValueError, "does not exist"),
    ("image-a-number", lambda e: parse(e, sample(image=5)), ValueError, "'image' must be a path"),
    ("data-not-a-list", lambda e: dataset(e, {"id": "s1"}), ValueError, "must hold a JSON list of samples"),
    ("data-malformed-json", lambda e: dataset(e, b"[{", raw=True), ValueError, "Expecting"),
    ("data-only-bad-samples", lambda e: dataset(e, [sample(image="missing.png")]), ValueError, "has no usable samples"),
    ("image-file-corrupt", lambda e: dataset(e, [sample()], corrupt_image=True), ValueError, "cannot read its images"),
]


def malicious_folder(env, marker: Path, fmt="zip", payload="os.system"):
    """An original-format folder whose pytorch_model.bin runs `payload` (creating `marker`) when unpickled."""
    src = env.original()
    write_malicious_pickle(src / "pytorch_model.bin", marker, fmt, payload)
    return src


class Payload:
    def __init__(self, marker: Path, payload: str):
        self.marker, self.payload = str(marker), payload

    def __reduce__(self):
        if self.payload == "os.system":
            return os.system, (f"touch {self.marker}",)
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def write_malicious_pickle(path: Path, marker: Path, fmt: str, payload: str):
    weights = {"lm_head.weight": torch.zeros(2), "evil": Payload(marker, payload)}
    if fmt == "zip":
        torch.save(weights, path)
    elif fmt == "legacy":
        torch.save(weights, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, not torch's format
        path.write_bytes(pickle.dumps(weights))


CASES = [
    pytest.param(entry, call, error, fragment, id=f"{entry}:{name}")
    for entry, cases in [
        ("image_processor", IMAGE_PROCESSOR_CASES),
        ("processor", PROCESSOR_CASES),
        ("video", VIDEO_CASES),
        ("model", MODEL_CASES),
        ("chat", CHAT_CASES),
        ("config", CONFIG_CASES),
        ("convert", CONVERTER_CASES),
        ("finetune", FINETUNE_CASES),
    ]
    for name, call, error, fragment in cases
]


@pytest.mark.parametrize("entry, call, error, fragment", CASES)
def test_bad_input_gets_a_clear_error(entry, call, error, fragment, request, tmp_path):
    env = Env(request, tmp_path)
    with torch.no_grad(), pytest.raises(Exception) as caught:
        call(env)
    assert isinstance(caught.value, error), f"{entry}: expected {error.__name__}, got {caught.type.__name__}: {caught.value}"
    assert fragment in str(caught.value), f"{entry}: {fragment!r} is not in the message {str(caught.value)!r}"


def test_the_catalogue_is_large_and_covers_every_entry_point():
    assert len(CASES) >= 30
    assert {p.values[0] for p in CASES} == {"image_processor", "processor", "video", "model", "chat", "config", "convert",
                                            "finetune"}


# Documented graceful behaviour: inputs that are odd but valid get a sensible answer, not an error.


def test_odd_but_valid_inputs_are_handled_gracefully(model, processor):
    # No images at all: empty lists, and a (0, 3, H, W) tensor with a text-only prompt.
    assert ip.OmniLMMImageProcessor()([])["pixel_values"] == []
    assert ip.OmniLMMImageProcessor()([[], []])["pixel_values"] == [[], []]
    with torch.no_grad():
        text_only = model(input_ids=ids([5, 6])).logits
        empty = model(input_ids=ids([5, 6]), pixel_values=torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)).logits
    torch.testing.assert_close(empty, text_only)
    # A 1x1 image, any PIL mode, a thin image in square mode: all become one (3, 112, 112) tensor.
    for image in [Image.new("RGB", (1, 1)), Image.new("I;16", (3, 2)), Image.new("L", (1, 5000))]:
        out = processor(text="<image>", images=image)
        assert [tuple(t.shape) for t in out["pixel_values"][0]] == [(3, IMAGE_SIZE, IMAGE_SIZE)]
    # An empty message content still gets an answer.
    assert isinstance(model.chat(msgs=user(""), sampling=False, max_new_tokens=2), str)


def test_a_failed_conversion_leaves_no_half_written_folder(request, tmp_path):
    src = Env(request, tmp_path).original(state_dict=with_key("lm_head.weight", torch.zeros(3, 3)))
    dst = tmp_path / "converted"
    with pytest.raises(ValueError, match="has shape"):
        convert(src, dst)  # fails after the first shard was written
    assert not dst.exists()
    (src / "config.json").write_text(json.dumps({"num_query": "abc"}))
    dst.mkdir()
    with pytest.raises(ValueError, match="not a valid OmniLMM config"):
        convert(src, dst)  # the config is checked before anything is written
    assert dst.is_dir() and not any(dst.iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# 3. Untrusted files: pickles never run code; remote code imports only declared packages and stays offline
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("fmt", ["zip", "legacy", "bare-pickle"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(request, tmp_path, fmt, payload):
    env = Env(request, tmp_path)
    # Control: the payload is live, unpickling the file without weights_only really runs it.
    control = tmp_path / "control-marker"
    write_malicious_pickle(tmp_path / "control.bin", control, fmt, payload)
    if fmt == "bare-pickle":
        pickle.loads((tmp_path / "control.bin").read_bytes())
    else:
        torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists(), "the crafted pickle is not malicious: the test would prove nothing"

    marker = tmp_path / "marker"
    src = malicious_folder(env, marker, fmt, payload)
    with pytest.raises(ValueError, match="not a plain tensor checkpoint and was refused"):
        convert(src, tmp_path / "converted")
    assert not marker.exists(), "omnilmm-convert ran code from the checkpoint"
    assert not (tmp_path / "converted").exists()


def test_malicious_pickle_is_refused_by_the_command_line(request, tmp_path):
    from omnilmm_tools.convert import main

    env = Env(request, tmp_path)
    marker = tmp_path / "marker"
    with pytest.raises(SystemExit, match="^omnilmm-convert: error: .*refused"):  # one line, no traceback
        main([str(malicious_folder(env, marker)), str(tmp_path / "converted")])
    assert not marker.exists()


ALLOWED_IMPORTS = {"torch", "torchvision", "transformers", "timm", "numpy", "PIL", "huggingface_hub", "av", "optimum"}
# imported in a `try` block, so that the files load without them: PyAV for video files, optimum-quanto for quantized
# folders
OPTIONAL_IMPORTS = {"av", "optimum"}


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_imports_only_declared_dependencies(name):
    tree = ast.parse((ROOT / name).read_text(), filename=name)
    siblings = {Path(f).stem for f in REMOTE_CODE_FILES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 1 and node.module in siblings, f"{name}:{node.lineno}: relative import {node.module}"
            continue
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            assert top in ALLOWED_IMPORTS or top in sys.stdlib_module_names, f"{name}:{node.lineno} imports {module}"
            assert top not in siblings, f"{name}:{node.lineno}: import siblings relatively (from .{top} import ...)"
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    forbidden = calls & {"eval", "exec", "compile", "__import__"}
    assert not forbidden, f"{name} calls {forbidden}"
    # What transformers requires installed before it runs the file (trust_remote_code): never an optional package.
    from transformers.dynamic_module_utils import get_imports

    assert not OPTIONAL_IMPORTS & set(get_imports(str(ROOT / name))), f"{name} requires an optional package"


@pytest.fixture
def no_network(monkeypatch):
    """Every socket creation, name lookup and connection raises, and is recorded (even if someone catches it)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(OSError, match="network access attempted"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    attempts.clear()
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def test_loading_and_answering_opens_no_connection(folder, no_network):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text="<image>\nWhat is it?", images=photo())
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    answer = model.chat(image=photo(), msgs=user("What is it?"), sampling=False, max_new_tokens=3)
    assert isinstance(answer, str)


def test_converting_opens_no_connection(tmp_path, no_network):
    out = convert(TINY / "original", tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(model).__name__ == "OmniLMMForCausalLM"


# ---------------------------------------------------------------------------------------------------------------------
# 4. dtypes: fp32, bf16 and (where the CPU runs it) fp16 give finite logits; other pixel dtypes are cast
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_model_dtypes_give_finite_logits(folder, processor, dtype):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    assert model.dtype == dtype
    inputs = processor(text="<image>\nWhat is it?", images=photo())
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    except RuntimeError as error:
        if dtype is torch.float16 and "not implemented for 'Half'" in str(error):
            pytest.skip(f"this CPU build of torch has no fp16 kernel for an op of the model: {error}")
        raise
    assert logits.dtype == dtype and torch.isfinite(logits).all()


@pytest.mark.parametrize("pixel_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_pixel_values_of_another_dtype_are_cast(model, pixel_dtype):
    images = pixels(2).to(pixel_dtype)
    prompt = ids([5], "img", [6], "img")
    with torch.no_grad():
        logits = model(input_ids=prompt, pixel_values=images).logits
        reference = model(input_ids=prompt, pixel_values=images.float()).logits
        nested = model(input_ids=prompt, pixel_values=[list(images)]).logits
        features = model(input_ids=prompt, vision_hidden_states=model.get_vision_embedding(images).to(pixel_dtype)).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference)
    torch.testing.assert_close(nested, reference)
    assert torch.isfinite(features).all()
