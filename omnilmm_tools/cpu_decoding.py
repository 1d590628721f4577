"""A faster LM head for decoding small batches on the CPU (a tool, not part of the remote code).

MKL's GEMM for a few rows against the whole `vocab x hidden` weight runs 1.3-1.9x slower than on cache-sized blocks
of it (`omnilmm-bench`, comparison 5). `block_lm_head(model)` makes the model's head multiply in blocks of
`BLOCK` vocabulary rows when that pays (CPU, no gradients, 2-64 rows); everything else is the plain call. The
weight, its name in the state dict and the results stay the same.
"""

import torch
from torch import nn

BLOCK = 2048


class BlockedLMHead(nn.Linear):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.numel() // hidden_states.shape[-1]
        if self.weight.device.type != "cpu" or torch.is_grad_enabled() or not 2 <= rows <= 64:
            return super().forward(hidden_states)
        blocks = self.weight.split(BLOCK)
        biases = self.bias.split(BLOCK) if self.bias is not None else [None] * len(blocks)
        return torch.cat([nn.functional.linear(hidden_states, w, b) for w, b in zip(blocks, biases)], dim=-1)


def block_lm_head(model) -> None:
    """Give `model.lm_head` (a plain `nn.Linear` on the CPU, not offloaded) the blocked forward, in place."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight.device.type == "cpu" and not hasattr(head, "_hf_hook"):
        head.__class__ = BlockedLMHead
