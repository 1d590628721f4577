"""`omnilmm-eval-shapes`: exact-answer accuracy of an OmniLMM folder on freshly generated shapes questions.

    omnilmm-eval-shapes --model demo_model --seed 1234 --n 200
    omnilmm-eval-shapes --model demo_model --seed 1234 --n 200 --shuffle-images   # control: near chance

Images and questions come from `omnilmm_tools.shapes` with `--seed` (use one that training never saw; the demo
model was trained on `shapes.write_dataset(..., seed=0)` data, whose generator stream differs from every evaluation
seed's). Answers are decoded greedily and compared with the expected word (case and a final full stop ignored).
`--shuffle-images` gives each question the image of another question of the same type: a model that reads the
image must fall to about chance there.
"""

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import Parser, fail, positive_int, torch_device
from .cpu_decoding import block_lm_head
from .remote import DEMO_MODEL
from .shapes import COLOURS, COUNT_WORDS, POSITIONS, QUESTION_TYPES, SHAPES, eval_items

CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS), "count": 1 / len(COUNT_WORDS),
          "binding": (1 / len(COLOURS) + 1 / len(SHAPES)) / 2}


def load(model_dir, device=None):
    """Model (fp32 on CPU, its saved dtype on GPU) and processor of a Hub folder."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype).to(device).eval()
    block_lm_head(model)  # faster CPU decoding of small batches
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".!").strip()


def shuffled_images(items, seed: int) -> list:
    """Each item's image replaced by the image of another item of the same question type (a seeded derangement)."""
    rng = random.Random(f"shuffle-{seed}")
    by_type = defaultdict(list)
    for index, item in enumerate(items):
        by_type[item.qtype].append(index)
    images = [item.image for item in items]
    for indices in by_type.values():
        if len(indices) < 2:
            continue
        order = indices[:]
        rng.shuffle(order)
        for a, b in zip(order, order[1:] + order[:1]):  # a cycle: nobody keeps their own image
            images[a] = items[b].image
    return images


@torch.no_grad()
def answer_batch(model, processor, images, questions, max_new_tokens=5) -> list[str]:
    """Greedy answers to one question per image: the chat template, the processor (left padding), `generate`."""
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": f"<image>\n{q}"}], add_generation_prompt=True,
                                      tokenize=False)
        for q in questions
    ]
    inputs = processor(text=prompts, images=[[image] for image in images], return_tensors="pt")
    pixel_values = [[t.to(model.device, model.dtype) for t in sample] for sample in inputs["pixel_values"]]
    output = model.generate(
        input_ids=inputs["input_ids"].to(model.device),
        attention_mask=inputs["attention_mask"].to(model.device),
        pixel_values=pixel_values,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    return [a.strip() for a in processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def evaluate(model, processor, seed: int, n: int, shuffle_images: bool = False, batch_size: int = 16,
             max_new_tokens: int = 5) -> dict:
    """Accuracy per question type (and overall) on `n` fresh items of `seed`; also returns the answers."""
    items = eval_items(seed, n)
    images = shuffled_images(items, seed) if shuffle_images else [item.image for item in items]
    answers = []
    for start in tqdm(range(0, len(items), batch_size), desc="evaluating", unit="batch", leave=False):
        batch = range(start, min(start + batch_size, len(items)))
        answers += answer_batch(model, processor, [images[i] for i in batch], [items[i].question for i in batch],
                                max_new_tokens)
    correct, total = defaultdict(int), defaultdict(int)
    records = []
    for item, answer in zip(items, answers):
        ok = normalise(answer) == item.answer
        correct[item.qtype] += ok
        total[item.qtype] += 1
        records.append({"type": item.qtype, "question": item.question, "expected": item.answer, "answer": answer, "correct": ok})
    accuracy = {qtype: correct[qtype] / total[qtype] for qtype in QUESTION_TYPES if total[qtype]}
    accuracy["all"] = sum(correct.values()) / max(sum(total.values()), 1)
    return {"accuracy": accuracy, "counts": dict(total), "records": records}


def format_table(result: dict) -> str:
    lines = ["| question type | n | exact answers | chance |", "|---|---|---|---|"]
    for qtype in (*QUESTION_TYPES, "all"):
        if qtype not in result["accuracy"]:
            continue
        n = result["counts"].get(qtype, sum(result["counts"].values()))
        chance = f"{CHANCE[qtype]:.0%}" if qtype in CHANCE else ""
        lines.append(f"| {qtype} | {n} | {result['accuracy'][qtype]:.1%} | {chance} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = Parser("omnilmm-eval-shapes", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL),
                        help="a Hub folder (default: the demo model that comes with this package)")
    parser.add_argument("--seed", type=int, default=12345, help="generator seed of the evaluation images")
    parser.add_argument("--n", type=positive_int, default=200, help="number of questions (the four types in turn)")
    parser.add_argument("--shuffle-images", action="store_true", help="control: each question gets another one's image")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="questions per generate call")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="cpu, cuda, cuda:1, mps ... (default: cuda when available, else cpu)")
    parser.add_argument("--json", dest="json_path", help="also write the accuracies and every answer to this file")
    parser.add_argument("--show-errors", type=int, default=0, help="print up to this many wrong answers")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        fail(parser.prog, f"{args.model} is not a model folder (it has no config.json)")
    torch.manual_seed(0)
    model, processor = load(args.model, args.device)
    start = time.time()
    result = evaluate(model, processor, args.seed, args.n, args.shuffle_images, args.batch_size)
    control = " (images shuffled: control)" if args.shuffle_images else ""
    print(f"{args.model}: {args.n} questions, seed {args.seed}{control}, {time.time() - start:.1f} s")
    print(format_table(result))
    if args.show_errors:
        for record in [r for r in result["records"] if not r["correct"]][: args.show_errors]:
            print(f"  wrong: {record['question']!r} -> {record['answer']!r} (expected {record['expected']!r})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
