"""KL(baseline || model) and top-1 agreement on the evaluation windows (evaluate/divergence.py)."""
import copy

import pytest
import torch

from compress.evaluate.divergence import Reference, evaluate_windows
from compress.evaluate.perplexity import perplexity


def _windows(count=3, seq_len=48):
    generator = torch.Generator().manual_seed(3)
    return torch.randint(1, 256, (count, seq_len), generator=generator)


def _baseline(model, windows, cache, batch_size=2):
    ref = Reference(model, windows, cache=cache)
    out = evaluate_windows(model, windows, batch_size, "cpu", record_into=ref)
    return ref, out


def _perturbed(model, scale=0.1):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in other.model.layers:
            for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
                linear.weight.add_(scale * torch.randn(linear.weight.shape, generator=generator))
    return other


def _direct_kl(base, other, windows):
    """KL(base || other) and top-1 agreement in float64, straight from the two models' logits
    (one window per forward, as the reference runs, so float32 batching noise does not enter)."""
    with torch.no_grad():
        p = torch.cat([torch.log_softmax(base(w[None]).logits[:, :-1].double(), -1)
                       for w in windows])
        q = torch.cat([torch.log_softmax(other(w[None]).logits[:, :-1].double(), -1)
                       for w in windows])
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    return kl, agree


@pytest.mark.parametrize("cache", [True, False])
def test_model_against_itself_is_zero_kl_and_full_agreement(tiny_model, cache):
    windows = _windows()
    ref, base = _baseline(tiny_model, windows, cache)
    # The same batching as the baseline: the same logits, so exactly 0 (the model's log-probs
    # are rounded as the cache stores the baseline's).
    same = evaluate_windows(copy.deepcopy(tiny_model), windows, 2, "cpu", reference=ref)
    assert same["kl_divergence"] == 0.0 and same["top1_agreement"] == 1.0
    out = evaluate_windows(tiny_model, windows, 1, "cpu", reference=ref)
    assert out["top1_agreement"] == 1.0
    # Batch 1 against 2: float32 batching noise only, far below any compression.
    assert 0 <= out["kl_divergence"] < 1e-6
    assert out["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)


@pytest.mark.parametrize("cache", [True, False])
def test_perturbed_model_matches_a_direct_float64_computation(tiny_model, cache):
    windows = _windows()
    other = _perturbed(tiny_model)
    ref, _ = _baseline(tiny_model, windows, cache)
    out = evaluate_windows(other, windows, 1, "cpu", reference=ref)
    kl, agree = _direct_kl(tiny_model, other, windows)
    assert kl > 1e-3
    # The float16 cache costs about 1e-4 relative here (near-uniform random-model log-probs at
    # -5.8 are where float16 is coarsest); recomputing leaves float32 log-probs (cancellation in
    # log p - log q costs a few 1e-6 relative).
    assert out["kl_divergence"] == pytest.approx(kl, rel=1e-3 if cache else 1e-5)
    assert out["top1_agreement"] == pytest.approx(agree, abs=1e-12)
    assert out["top1_agreement"] < 1.0
    assert out["tokens"] == windows[:, 1:].numel()


def test_same_perplexity_as_the_plain_evaluation(tiny_model):
    windows = _windows(count=4)
    ref, _ = _baseline(tiny_model, windows, cache=True)
    other = _perturbed(tiny_model, 0.02)
    for batch_size in (1, 3):
        plain = perplexity(other, windows, batch_size, "cpu")
        out = evaluate_windows(other, windows, batch_size, "cpu", reference=ref)
        # Same batches, same arithmetic: the same figure to the last bit.
        assert out["perplexity"] == plain["perplexity"] and out["nll"] == plain["nll"]


def test_reference_caches_only_within_its_memory_budget(tiny_model):
    windows = _windows(count=2, seq_len=33)
    size = Reference.cache_bytes(windows, tiny_model.config.vocab_size)
    assert size == 2 * 32 * 320 * 2
    assert Reference.plan(tiny_model, windows, max_cache_bytes=size).cache
    assert not Reference.plan(tiny_model, windows, max_cache_bytes=size - 1).cache


class _NearTie(torch.nn.Module):
    """Two next tokens whose logits differ by 1e-4: float16 log-probs cannot tell them apart."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, 16)
        logits[..., 3] = 5.0
        logits[..., 7] = 5.0 + 1e-4
        return type("Output", (), {"logits": logits})()


def test_top1_is_taken_before_the_cache_rounds_the_log_probs():
    """Agreement of a model with itself is 1 even where the cached float16 copy ties two
    tokens: the baseline's top-1 is kept from its float log-probs."""
    model, windows = _NearTie(), torch.randint(0, 16, (2, 8))
    ref, _ = _baseline(model, windows, cache=True, batch_size=1)
    assert evaluate_windows(model, windows, 1, "cpu", reference=ref)["top1_agreement"] == 1.0


def test_a_diverged_model_has_infinite_perplexity_not_an_overflow(tiny_model):
    windows = _windows(count=2)
    ref, _ = _baseline(tiny_model, windows, cache=True)
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.model.norm.weight.mul_(1e5)       # logits so large the mean NLL passes 710 nats
    plain = perplexity(broken, windows, 2, "cpu")
    out = evaluate_windows(broken, windows, 2, "cpu", reference=ref)
    assert plain["nll"] > 710 and plain["perplexity"] == out["perplexity"] == float("inf")
    assert out["kl_divergence"] > 0
