"""A faster LM head for decoding small batches on the CPU (a tool, not part of the remote code).

MKL's GEMM for a few rows against the whole `vocab x hidden` weight can run 1.3-1.9x slower than on cache-sized
blocks of it (`omnilmm-bench`, comparison 5); the best block size depends on the CPU (2,048 vocabulary rows on the
AMD EPYC this was first measured on, 512 on an Intel Xeon). `block_lm_head(model)` times a few block sizes once on
8 rows and gives the model's head the fastest (or leaves it plain); the head then multiplies in blocks when that
pays (CPU, no gradients, 2-64 rows) and calls the plain GEMM otherwise. Weights, state-dict names and results stay.
"""

import time

import torch
from torch import nn

BLOCK_SIZES = (None, 512, 1024, 2048)  # None: the plain GEMM


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias, block: int | None) -> torch.Tensor:
    if block is None:
        return nn.functional.linear(x, weight, bias)
    biases = bias.split(block) if bias is not None else [None] * -(-weight.shape[0] // block)
    return torch.cat([nn.functional.linear(x, w, b) for w, b in zip(weight.split(block), biases)], dim=-1)


class BlockedLMHead(nn.Linear):
    block: int | None = 2048

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.numel() // hidden_states.shape[-1]
        if self.weight.device.type != "cpu" or torch.is_grad_enabled() or not 2 <= rows <= 64:
            return super().forward(hidden_states)
        return blocked_linear(hidden_states, self.weight, self.bias, self.block)


@torch.no_grad()
def fastest_block(head: nn.Linear, rows: int = 8, repeats: int = 3) -> int | None:
    x = torch.randn(rows, head.in_features, dtype=head.weight.dtype)
    timings = {}
    for block in BLOCK_SIZES:
        blocked_linear(x, head.weight, head.bias, block)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            blocked_linear(x, head.weight, head.bias, block)
        timings[block] = time.perf_counter() - start
    return min(timings, key=timings.get)


def block_lm_head(model) -> None:
    """Give `model`'s LM head (a plain `nn.Linear` on the CPU, not offloaded) the blocked forward, in place."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight.device.type == "cpu" and not hasattr(head, "_hf_hook"):
        block = fastest_block(head)
        if block is not None:
            head.__class__ = BlockedLMHead
            head.block = block
