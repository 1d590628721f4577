"""A synthetic visual question-answering task: coloured shapes on a plain background.

Every image is `size x size` RGB (224 by default) with one to three shapes (circle, square, triangle, star) of
distinct colours (red, green, blue, yellow, purple, orange), sizes and positions. Questions ask for a colour, a
shape, a position (left / right / top / bottom), a count, or (two shapes) the colour of the shape named by its kind or
the kind of the shape named by its colour ("binding"); the answer is always one lower-case word.
Everything is deterministic from a seed (`random.Random(seed)`), so a model can be evaluated on images it has never
seen by giving a seed that training did not use.

`write_dataset(...)` writes the MiniCPM-V fine-tuning format with PNG files next to it:
`[{"id", "image": path | {"<image_00>": path, ...}, "conversations": [{"role": "user", "content": "<image>\\n..."},
{"role": "assistant", "content": "red"}, ...]}]`, with multi-turn and multi-image samples mixed in.

    python -m omnilmm_tools.shapes --out runs/shapes --n 4000 --seed 0
"""

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 135, 10),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_TYPES = ("colour", "shape", "position", "count", "binding")
IMAGE_SIZE = 224


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    x: float  # centre, pixels
    y: float
    radius: float  # half the extent, pixels


@dataclass
class Item:
    """One image with one question about it."""

    image: Image.Image
    shapes: list
    question: str
    answer: str
    qtype: str


# --------------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------------


def _polygon(shape: Shape) -> list[tuple[float, float]]:
    x, y, r = shape.x, shape.y, shape.radius
    if shape.kind == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape.kind == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape.kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape.kind!r}")


def draw(shapes, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Render `shapes` on a near-white background, with a little colour jitter (deterministic from `rng`)."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    canvas = ImageDraw.Draw(image)
    for shape in shapes:
        colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[shape.colour])
        if shape.kind == "circle":
            r = shape.radius * 0.9
            canvas.ellipse([shape.x - r, shape.y - r, shape.x + r, shape.y + r], fill=colour)
        else:
            canvas.polygon(_polygon(shape), fill=colour)
    return image


# --------------------------------------------------------------------------------------------------------------------
# Scenes and questions
# --------------------------------------------------------------------------------------------------------------------


def _place(rng: random.Random, count: int, size: int, region: str | None = None) -> list[tuple[float, float, float]]:
    """`count` non-overlapping (x, y, radius) discs inside the image (or inside one region, for one shape)."""
    for _ in range(1000):
        discs = []
        for _ in range(count):
            radius = rng.uniform(0.12, 0.22) * size if count == 1 else rng.uniform(0.09, 0.15) * size
            if region is None:
                x, y = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
            else:  # clearly in one of the four regions: near that edge, centred along it
                near = rng.uniform(radius + 0.02 * size, 0.30 * size)
                along = rng.uniform(0.38 * size, 0.62 * size)
                x, y = {"left": (near, along), "right": (size - near, along), "top": (along, near), "bottom": (along, size - near)}[region]
            discs.append((x, y, radius))
        if all(math.dist(a[:2], b[:2]) > a[2] + b[2] + 4 for i, a in enumerate(discs) for b in discs[i + 1 :]):
            return discs
    raise RuntimeError("could not place the shapes")  # pragma: no cover (never happens at these sizes)


def random_scene(rng: random.Random, count: int, size: int = IMAGE_SIZE, region: str | None = None) -> list[Shape]:
    """`count` shapes with distinct colours and distinct kinds (so "the red one" / "the circle" is unambiguous)."""
    colours = rng.sample(list(COLOURS), count)
    kinds = rng.sample(SHAPES, count)
    return [Shape(k, c, x, y, r) for k, c, (x, y, r) in zip(kinds, colours, _place(rng, count, size, region))]


def ask(rng: random.Random, qtype: str, size: int = IMAGE_SIZE):
    """A scene and one question of type `qtype` about it: `(shapes, question, answer)`.

    colour / shape: one shape, "what colour / shape is it"; position: one shape clearly at the left, right, top or
    bottom; count: one to three shapes; binding: two shapes, the colour of one named by its shape or the shape of
    one named by its colour ("What colour is the star?", "What shape is the red one?")."""
    if qtype == "count":
        shapes = random_scene(rng, rng.choice((1, 2, 3)), size)
        return shapes, rng.choice(("How many shapes are there?", "How many shapes are in the image?")), COUNT_WORDS[len(shapes)]
    if qtype == "position":
        region = rng.choice(POSITIONS)
        shapes = random_scene(rng, 1, size, region)
        question = rng.choice(("Where is the shape: left, right, top or bottom?", "Is the shape at the left, right, top or bottom?"))
        return shapes, question, region
    if qtype == "colour":
        shapes = random_scene(rng, 1, size)
        return shapes, rng.choice(("What colour is the shape?", "What color is the shape?", "Which colour is it?")), shapes[0].colour
    if qtype == "shape":
        shapes = random_scene(rng, 1, size)
        return shapes, rng.choice(("What shape is it?", "Which shape is in the image?", "What shape is this?")), shapes[0].kind
    if qtype == "binding":
        shapes = random_scene(rng, 2, size)
        target = shapes[0]
        if rng.random() < 0.5:
            return shapes, f"What colour is the {target.kind}?", target.colour
        return shapes, f"What shape is the {target.colour} one?", target.kind
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def make_item(rng: random.Random, qtype: str | None = None, size: int = IMAGE_SIZE) -> Item:
    qtype = qtype or rng.choice(QUESTION_TYPES)
    shapes, question, answer = ask(rng, qtype, size)
    return Item(draw(shapes, rng, size), shapes, question, answer, qtype)


def eval_items(seed: int, n: int, size: int = IMAGE_SIZE) -> list[Item]:
    """`n` single-image, single-question items, the question types in turn (n/5 each), deterministic from `seed`."""
    rng = random.Random(f"omnilmm-shapes-eval-{seed}")
    return [make_item(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)], size) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------------
# The fine-tuning data set (MiniCPM-V's format)
# --------------------------------------------------------------------------------------------------------------------


def _ordinal(i: int) -> str:
    return ("first", "second", "third")[i]


def scene_questions(rng: random.Random, shapes, region: str | None = None) -> list[tuple[str, str]]:
    """Every question (with its answer) that the scene answers, in the phrasings `ask` uses."""
    questions = [(rng.choice(("How many shapes are there?", "How many shapes are in the image?")), COUNT_WORDS[len(shapes)])]
    if len(shapes) == 1:
        target = shapes[0]
        questions.append((rng.choice(("What colour is the shape?", "What color is the shape?", "Which colour is it?")), target.colour))
        questions.append((rng.choice(("What shape is it?", "Which shape is in the image?", "What shape is this?")), target.kind))
        if region is not None:
            questions.append((rng.choice(("Where is the shape: left, right, top or bottom?",
                                          "Is the shape at the left, right, top or bottom?")), region))
    else:
        questions += [(f"What colour is the {s.kind}?", s.colour) for s in shapes]
        questions += [(f"What shape is the {s.colour} one?", s.kind) for s in shapes]
    return questions


# Scenes of the training data: one shape in one of the four regions, one shape anywhere, two or three shapes.
TRAIN_SCENES = {"region": 0.3, "single": 0.3, "two": 0.25, "three": 0.15}


def write_dataset(out_dir, n: int, seed: int, size: int = IMAGE_SIZE, max_questions: int = 4,
                  multi_image_prob: float = 0.1) -> Path:
    """Write `n` samples (PNG images + `data.json`) to `out_dir`; returns the JSON path.

    A sample is one image and all the questions it answers (at most `max_questions`, in random order) (a multi-turn conversation; more answers per
    image make training cheaper), or with probability `multi_image_prob` two images
    (`{"<image_00>": ..., "<image_01>": ...}`) and a question about one of them.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"omnilmm-shapes-train-{seed}")
    samples = []
    for index in range(n):
        sample_id = f"shapes-{seed}-{index:06d}"
        if rng.random() < multi_image_prob:
            qtype = rng.choice(("colour", "shape"))
            paths = {}
            scenes = []
            for k in range(2):
                shapes = random_scene(rng, 1, size)
                path = out_dir / "images" / f"{sample_id}-{k}.png"
                draw(shapes, rng, size).save(path)
                paths[f"<image_{k:02d}>"] = str(path.resolve())
                scenes.append(shapes)
            which = rng.randrange(2)
            target = scenes[which][0]
            question = f"What {qtype} is the shape in the {_ordinal(which)} image?"
            answer = target.colour if qtype == "colour" else target.kind
            conversations = [
                {"role": "user", "content": f"<image_00>\n<image_01>\n{question}"},
                {"role": "assistant", "content": answer},
            ]
            samples.append({"id": sample_id, "image": paths, "conversations": conversations})
            continue
        scene = rng.choices(list(TRAIN_SCENES), weights=list(TRAIN_SCENES.values()))[0]
        region = rng.choice(POSITIONS) if scene == "region" else None
        count = {"region": 1, "single": 1, "two": 2, "three": 3}[scene]
        shapes = random_scene(rng, count, size, region)
        questions = scene_questions(rng, shapes, region)
        qa = rng.sample(questions, min(max_questions, len(questions)))  # all of them (up to 4), in random order
        path = out_dir / "images" / f"{sample_id}.png"
        draw(shapes, rng, size).save(path)
        conversations = []
        for turn, (q, a) in enumerate(qa):
            conversations.append({"role": "user", "content": f"<image>\n{q}" if turn == 0 else q})
            conversations.append({"role": "assistant", "content": a})
        samples.append({"id": sample_id, "image": str(path.resolve()), "conversations": conversations})
    json_path = out_dir / "data.json"
    json_path.write_text(json.dumps(samples, indent=1) + "\n")
    return json_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m omnilmm_tools.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for data.json and images/")
    parser.add_argument("--n", type=int, default=4000, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    parser.add_argument("--max-questions", type=int, default=4, help="most questions (turns) per image")
    parser.add_argument("--multi-image-prob", type=float, default=0.1)
    args = parser.parse_args(argv)
    path = write_dataset(args.out, args.n, args.seed, args.size, args.max_questions, args.multi_image_prob)
    print(f"wrote {args.n} samples to {path}")


if __name__ == "__main__":
    main()
