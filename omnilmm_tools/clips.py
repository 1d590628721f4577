"""Video clips made here (tests, the bench, the demo's example): frames written with PyAV, and shapes clips for the
demo model (one coloured shape moving across the canvas of `omnilmm_tools.shapes`).

    python -m omnilmm_tools.clips clip.mp4 --seconds 4 --fps 8   # prints the shape and its colour
"""

import contextlib
import itertools
import random
from pathlib import Path

import numpy as np

from .cli import Parser
from .shapes import COLOURS, IMAGE_SIZE, SHAPES, Shape, draw

CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".gif": "gif", ".avi": "mpeg4"}


def write_video(path, frames, fps: int, codec: str | None = None, gop: int | None = None, **options) -> Path:
    """Write `frames` (an iterable of `(h, w, 3)` uint8 arrays or PIL images, all one size) to `path` at `fps`; the
    codec follows the suffix (`CODECS`) unless given, `gop` is the keyframe interval, `options` go to the encoder."""
    import av

    path, frames = Path(path), iter(frames)
    codec = codec or CODECS[path.suffix.lower()]
    first = np.asarray(next(frames))
    frames = itertools.chain([first], frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        stream.options = {key: str(value) for key, value in options.items()}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def shape_frames(rng: random.Random, seconds: float, fps: int, size: int = IMAGE_SIZE):
    """The frames of one shape of a random kind and colour moving left to right, and that `Shape`."""
    kind, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    radius, y = size * rng.uniform(0.14, 0.2), size * rng.uniform(0.35, 0.65)
    count = max(1, round(seconds * fps))
    shapes = [Shape(kind, colour, radius + (size - 2 * radius) * i / max(1, count - 1), y, radius)
              for i in range(count)]
    return [draw([shape], random.Random(0), size) for shape in shapes], shapes[0]


@contextlib.contextmanager
def count_decoded_frames():
    """Count the frames the OmniLMM video processor's decoder outputs inside the block: `[count]`."""
    from .remote import remote_module

    video_file, counter = remote_module("video_processing_omnilmm").VideoFile, [0]
    original = video_file._decoded

    def counting(self):
        for frame in original(self):
            counter[0] += 1
            yield frame

    video_file._decoded = counting
    try:
        yield counter
    finally:
        video_file._decoded = original


def main(argv=None) -> None:
    parser = Parser("python -m omnilmm_tools.clips", __doc__.split("\n\n")[0])
    parser.add_argument("out", help="the clip to write (.mp4, .webm, .gif, .avi, .mkv)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    frames, shape = shape_frames(random.Random(args.seed), args.seconds, args.fps)
    write_video(args.out, frames, args.fps)
    print(f"{args.out}: a {shape.colour} {shape.kind}, {len(frames)} frames")


if __name__ == "__main__":
    main()
