"""Perplexity on fixed windows (PROTOCOL.md): exp(mean next-token NLL over every predicted position)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, device: str | None = None,
               desc: str = "perplexity") -> dict:
    """Windows [n, seq_len] of token ids. Returns perplexity, mean NLL and the token count.

    Sums the NLL in float64 over every window, so the figure does not depend on batch size.
    """
    device = device or next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, leave=False):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += nll.double().item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"perplexity": perplexity_of(mean), "nll": mean, "tokens": total_tokens}


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL); inf for a diverged model (math.exp overflows past ~709.78 nats), which the
    report shows and the gate fails, instead of an OverflowError that loses the whole result."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
