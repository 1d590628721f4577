"""Comparison 5 of `omnilmm-bench`: batched generation."""

import torch

from ..cpu_decoding import block_lm_head
from .common import BATCH, NUM_QUERY, Bench, decoding_ceiling, fmt_s, header, image_prompt_ids, median, paired_ratio


def bench_batched(bench: Bench, model, processor):
    header(f"5. Batched generation: one batch of {BATCH} prompts vs {BATCH} calls of one")
    block_lm_head(model)  # the project's best CPU decoding path (omnilmm_tools.cpu_decoding)
    new_tokens = bench.preset["new_tokens"]["batched"]
    questions = [
        "What is this?", "Describe the image.", "What colours do you see?", "Is there any text in the picture?",
        "Count the stripes, please.", "Where could this photo have been taken?", "Write a caption.",
        "What is unusual about this image, if anything?",
    ]
    generator = torch.Generator().manual_seed(0)
    samples = []
    for question in questions[:BATCH]:
        ids = image_prompt_ids(processor, f"<image>\n{question}")[0].tolist()
        features = torch.randn(1, NUM_QUERY, model.config.hidden_size, generator=generator).to(bench.device, model.dtype)
        samples.append((ids, features))
    width = max(len(ids) for ids, _ in samples)
    batch_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in samples], device=bench.device)
    batch_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in samples], device=bench.device)
    batch_features = torch.cat([features for _, features in samples])
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def batched():
        with torch.inference_mode():
            return model.generate(batch_ids, attention_mask=batch_mask, vision_hidden_states=batch_features, **settings)

    def one_by_one():
        with torch.inference_mode():
            for ids, features in samples:
                ids = torch.tensor([ids], device=bench.device)
                model.generate(ids, attention_mask=torch.ones_like(ids), vision_hidden_states=features, **settings)

    with torch.inference_mode():  # warm-up, short
        model.generate(batch_ids, attention_mask=batch_mask, vision_hidden_states=batch_features, **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})
    times = bench.alternate({"batched": batched, "one by one": one_by_one}, bench.preset["reps"]["batched"], warmup=0)
    tokens = BATCH * new_tokens
    ceiling, t_one, t_many = decoding_ceiling(bench, model, BATCH)
    gain = paired_ratio(times["one by one"], times["batched"])
    bench.add(
        "5 batched generation",
        f"throughput batch of {BATCH} / {BATCH} calls of one, over its limit here",
        gain / ceiling,
        ">= 0.85",
        f"{gain:.2f}x ({width}-token prompts, {new_tokens} new): batch {tokens / median(times['batched']):.1f} tok/s "
        f"({fmt_s(median(times['batched']))}), one by one {tokens / median(times['one by one']):.1f} tok/s "
        f"({fmt_s(median(times['one by one']))}). The limit, measured: a decoding step's matrix products (every "
        f"linear layer and the LM head, as the model runs them) take {fmt_s(t_many)} for {BATCH} rows against "
        f"{fmt_s(t_one)} for 1, so batching can speed them up by at most {ceiling:.2f}x on this machine",
    )
