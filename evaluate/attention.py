"""Decode attention that reads the grouped K/V cache as it is stored (`compress bench
--gqa-decode`).

With a static cache, transformers' SDPA attention gets a mask at every decode step and, for
grouped-query models, first repeats each key/value head for its query heads (`repeat_kv`): a
copy of the whole cache, times the group size, written and read back at every layer and step.
For Llama-3-8B at batch 1 and a 641-token cache that is about 0.7 GB a step against 15 GB of
weights; it grows with the batch and the cache (about 5 GB at batch 8). Here a decode step instead
lays the group's query heads out as rows of one query block per key/value head, so SDPA reads
each cached head once; prefill and models without groups take transformers' own SDPA path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "compress_gqa_sdpa"


def gqa_decode_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: query [b, heads, q_len, d], key / value
    [b, kv_heads, kv_len, d]; returns ([b, q_len, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or attention_mask is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    # Head h reads key/value head h // groups (repeat_kv's order): rows of one block per kv head.
    rows = query.reshape(batch, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask,
                                         scale=scaling)            # mask [b, 1, 1, L] broadcasts
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


class AttentionSwap:
    """`undo()` gives the model back the attention implementation it had."""

    def __init__(self, config, previous: str):
        self._config, self._previous = config, previous

    def undo(self) -> None:
        self._config._attn_implementation = self._previous


def use_gqa_decode_attention(model: nn.Module) -> AttentionSwap | None:
    """Switch a model that runs transformers' SDPA attention with grouped key/value heads to
    `gqa_decode_sdpa`, registering it (and SDPA's mask function under its name) with
    transformers; None for other models (without groups there is no repeat_kv copy to spare)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    config = model.config
    if config._attn_implementation != "sdpa" or \
            config.num_attention_heads == config.num_key_value_heads:
        return None
    AttentionInterface.register(NAME, gqa_decode_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    swap = AttentionSwap(config, config._attn_implementation)
    config._attn_implementation = NAME
    return swap
