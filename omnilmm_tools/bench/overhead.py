"""Comparison 3 of `omnilmm-bench`: generation overhead."""

import torch

from .common import NUM_QUERY, Bench, fmt_s, header, image_prompt_ids, median, paired_ratio


def bench_generation_overhead(bench: Bench, model, twin, processor):
    header("3. Generation overhead: OmniLMM generate (image features precomputed) vs MistralForCausalLM.generate")
    new_tokens = bench.preset["new_tokens"]["overhead"]
    ids = image_prompt_ids(processor, "<image>\nDescribe this picture in detail, with its colours and shapes.")
    ids = ids.to(bench.device)
    dtype = model.dtype
    features = torch.randn(1, NUM_QUERY, model.config.hidden_size, device=bench.device, dtype=dtype)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(model.model.get_placeholder_mask(ids, embeds, features), features)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def ours():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, vision_hidden_states=features, **settings)

    def plain():
        with torch.inference_mode():
            return twin.generate(inputs_embeds=embeds, attention_mask=mask, **settings)

    first, second = ours()[0, ids.shape[1] :], plain()[0, -new_tokens:]
    same = torch.equal(first.cpu(), second.cpu())
    times = bench.alternate({"ours": ours, "plain": plain}, bench.preset["reps"]["overhead"])
    bench.add(
        "3 generation overhead",
        f"OmniLMM.generate / Mistral.generate ({ids.shape[1]}-token prompt, {new_tokens} new)",
        paired_ratio(times["ours"], times["plain"]),
        "<= 1.05",
        f"ours {fmt_s(median(times['ours']))}, Mistral {fmt_s(median(times['plain']))}; same tokens: {same}",
    )
