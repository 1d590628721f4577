"""Comparison 4 of `omnilmm-bench`: multi-turn."""

import torch

from ..remote import remote_module
from .common import Bench, fmt_s, header, median, paired_ratio, synthetic_photo


def bench_multiturn(bench: Bench, model, processor):
    header("4. Multi-turn: second chat() turn about the same image (features reused) vs a text-only turn")
    new_tokens = bench.preset["new_tokens"]["multiturn"]
    photo = synthetic_photo(*bench.preset["tile_image"], seed=1)
    question, answer, follow_up = "What is in this picture?", "A pattern of coloured waves and stripes.", "Which colour dominates?"
    image_turn = [
        {"role": "user", "content": [photo, question]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": follow_up},
    ]
    settings = dict(processor=processor, sampling=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def prompt_length(msgs, with_image):
        modeling = remote_module("modeling_omnilmm")
        conversation, visuals = modeling.chat_conversation(msgs)
        images = [image for _, image in visuals]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return processor(text=[text], images=[images] if with_image else None)["input_ids"].shape[1]

    target = prompt_length(image_turn, True)
    filler_words = target  # grow or shrink a filler text until the text-only prompt has the same length
    for _ in range(20):
        filler = " ".join(["word"] * max(filler_words, 0))
        text_turn = [
            {"role": "user", "content": f"{filler}\n{question}"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": follow_up},
        ]
        length = prompt_length(text_turn, False)
        if length == target:
            break
        filler_words += target - length
    model.clear_chat_cache()
    with torch.inference_mode():
        model.chat(msgs=image_turn[:1], **settings)  # first turn: encodes the image (untimed)

    def second_turn():
        return model.chat(msgs=image_turn, **settings)

    def text_only():
        return model.chat(msgs=text_turn, **settings)

    times = bench.alternate({"image turn": second_turn, "text turn": text_only}, bench.preset["reps"]["multiturn"])
    bench.add(
        "4 multi-turn",
        f"2nd turn with cached image / text-only turn ({target} tokens, {new_tokens} new)",
        paired_ratio(times["image turn"], times["text turn"]),
        "<= 1.05",
        f"image turn {fmt_s(median(times['image turn']))}, text-only {fmt_s(median(times['text turn']))}"
        + ("" if length == target else f" (text-only prompt {length} tokens)"),
    )
    model.clear_chat_cache()
