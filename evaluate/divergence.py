"""Perplexity plus the distance of a model's next-token distribution from a reference (baseline):
KL(reference || model), averaged over every predicted position, and top-1 token agreement, all
from the same forward pass on the same evaluation windows as perplexity.

The reference is computed once per sweep and reused for every recipe. It is never written to disk:
`Reference` keeps each window's log-probs in memory as float16 when they fit a memory budget
(SmolLM2: 20 windows x 1023 x 49152 x 2 bytes = 2.01 GB, 1.87 GiB), otherwise it keeps the
baseline model and recomputes a window's log-probs when asked (one extra baseline forward per
window and recipe; an 8B model's 128k vocabulary makes a cache of even a few windows too big).

Why float16 log-probs and not bfloat16 or logits: the probable tokens carry the KL, and their
log-probs are near 0 where float16's absolute error is smallest (about 1e-3 at |x| ~ 4, 1e-4 at
|x| < 0.5); bfloat16 keeps 3 fewer mantissa bits. The stored values are re-normalized
(log_softmax in float32) before use, so the reference is a proper distribution, and a model's
log-probs are rounded the same way before the KL, so a model identical to the baseline is at 0
exactly. Measured on SmolLM2 (3 pydoc windows) with this rounding, the KL from the cache differs
from the KL against a recomputed float32 baseline by 1.1e-5 relative for int4-g64 and 1.5e-4 for
int8 per channel (whose KL is 3e-3 nats). The top-1 token of the reference is kept exactly (int32
ids from the float32 logits), so rounding never flips agreement. The KL is summed in float32
over the vocabulary and in float64 over positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.evaluate.perplexity import perplexity_of

DEFAULT_CACHE_BYTES = 4 << 30   # 4 GiB
CACHE_DTYPE = torch.float16


class Reference:
    """The baseline's next-token distribution on fixed windows: cached or recomputed per window."""

    def __init__(self, model, windows: torch.Tensor, cache: bool):
        self.windows = windows
        self.cache = cache
        # Recompute mode keeps the model (the session holds it anyway); cache mode drops it.
        self._model = None if cache else model
        self._log_probs: dict[int, torch.Tensor] = {}   # window index -> [seq_len-1, vocab] fp16
        self._top1: dict[int, torch.Tensor] = {}        # window index -> [seq_len-1] int32

    @staticmethod
    def cache_bytes(windows: torch.Tensor, vocab: int) -> int:
        count, seq_len = windows.shape
        return count * (seq_len - 1) * vocab * torch.finfo(CACHE_DTYPE).bits // 8

    @classmethod
    def plan(cls, model, windows: torch.Tensor, max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        """A reference that caches when the float16 log-probs fit `max_cache_bytes`."""
        vocab = model.config.vocab_size
        return cls(model, windows, cls.cache_bytes(windows, vocab) <= max_cache_bytes)

    def describe(self) -> dict:
        return {"kind": "KL(baseline || model), nats, mean over predicted positions",
                "reference": "float16 log-probs cached in memory" if self.cache
                else "baseline recomputed per window (cache over budget)"}

    def record(self, index: int, log_probs: torch.Tensor, top1: torch.Tensor) -> None:
        """Store the baseline's log-probs of window `index` ([seq_len-1, vocab], float32)."""
        if self.cache:
            self._log_probs[index] = log_probs.to("cpu", CACHE_DTYPE)
            self._top1[index] = top1.to("cpu", torch.int32)

    def get(self, index: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 log-probs [seq_len-1, vocab], top-1 ids [seq_len-1]) of window `index`."""
        if not self.cache:
            ids = self.windows[index: index + 1].to(device)
            logits = self._model(ids, use_cache=False).logits[0, :-1].float()
            return F.log_softmax(logits, dim=-1), logits.argmax(-1)
        if index not in self._log_probs:
            raise RuntimeError(f"reference window {index} was never recorded; evaluate the "
                               "baseline with record_into=this reference first")
        log_probs = F.log_softmax(self._log_probs[index].to(device, torch.float32), dim=-1)
        return log_probs, self._top1[index].to(device, torch.long)

    def comparable(self, log_probs: torch.Tensor) -> torch.Tensor:
        """A model's float32 log-probs rounded as the cached reference was (float16, then
        re-normalized): a model identical to the baseline is then at KL exactly 0, as it is
        against a recomputed reference, instead of at the cache's rounding floor."""
        if not self.cache:
            return log_probs
        return F.log_softmax(log_probs.to(CACHE_DTYPE).float(), dim=-1)


@torch.no_grad()
def evaluate_windows(model, windows: torch.Tensor, batch_size: int = 1, device=None,
                     reference: Reference | None = None, record_into: Reference | None = None,
                     desc: str = "perplexity") -> dict:
    """Perplexity of `model` on `windows` [n, seq_len]; with `reference`, also `kl_divergence`
    and `top1_agreement`; with `record_into`, stores this model's distribution as a reference.

    The NLL is computed exactly as evaluate.perplexity does (cross entropy of the float32 logits,
    summed in float64), so both give the same figure.
    """
    device = device or next(model.parameters()).device
    total_nll, total_kl, agree, tokens = 0.0, 0.0, 0, 0
    index = 0
    for batch in tqdm(windows.split(batch_size), desc=desc, leave=False):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="sum")
        total_nll += nll.double().item()
        tokens += targets.numel()
        if reference is None and record_into is None:
            index += batch.shape[0]
            continue
        for row in range(batch.shape[0]):
            log_probs = F.log_softmax(logits[row], dim=-1)
            top1 = logits[row].argmax(-1)
            if record_into is not None:
                record_into.record(index, log_probs, top1)
            if reference is not None:
                ref_log_probs, ref_top1 = reference.get(index, device)
                total_kl += kl_sum(ref_log_probs, reference.comparable(log_probs))
                agree += int((ref_top1 == top1).sum())
            index += 1
    mean = total_nll / tokens
    out = {"perplexity": perplexity_of(mean), "nll": mean, "tokens": tokens}
    if reference is not None:
        out["kl_divergence"] = total_kl / tokens
        out["top1_agreement"] = agree / tokens
    return out


def kl_sum(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """sum over positions of KL(ref || model) = sum_v p_ref(v) (log p_ref(v) - log p(v)).

    float32 over the vocabulary (one position's terms), float64 across positions. Terms with
    p_ref = 0 contribute 0 (xlogy convention), as in torch.nn.functional.kl_div.
    """
    per_position = F.kl_div(log_probs, ref_log_probs, reduction="none", log_target=True).sum(-1)
    return per_position.double().sum().item()
