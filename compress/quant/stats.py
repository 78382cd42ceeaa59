"""Statistics of linear-layer inputs gathered during calibration, shared by GPTQ and AWQ.

Linears that read the same tensor (q/k/v; gate/up) share one set of statistics, so a decoder
layer needs four Gram matrices, not seven: the costliest part of calibration after the forward.
"""
from __future__ import annotations

import torch

from compress.adapters import Adapter


def input_groups(adapter: Adapter) -> list[tuple[str, ...]]:
    """Linears of one decoder layer grouped by the input they share, in execution order.

    The first name of each group is the one whose input is observed."""
    a, m = adapter.attention, adapter.mlp
    return [(f"{a}.{adapter.q}", f"{a}.{adapter.k}", f"{a}.{adapter.v}"),
            (f"{a}.{adapter.o}",),
            (f"{m}.{adapter.gate}", f"{m}.{adapter.up}"),
            (f"{m}.{adapter.down}",)]


# Below this many features a Gram matrix is one matmul; above, see `gram`.
GRAM_LEAF = 256


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x in float32 for 2-D x [tokens, features].

    GPTQ/AWQ calibration spends about half its matmul time here, so the symmetry is used: split
    the features in halves, compute the off-diagonal block once and recurse on the diagonal
    ones (5/8 of the multiply-adds for 576 features, 9/16 for 1536; measured 0.68x and 0.66x
    the time of one matmul on the 2-core CPU). Each entry is still one dot product over all
    tokens, so on MKL the result is bit-identical to x.T @ x (tests/test_gptq.py checks)."""
    x = x.float()
    features = x.shape[1]
    if features <= GRAM_LEAF:
        return x.T @ x
    half = features // 2
    a, b = x[:, :half], x[:, half:]
    out = x.new_empty(features, features)
    out[:half, :half] = gram(a)
    out[half:, half:] = gram(b)
    out[:half, half:] = a.T @ b
    out[half:, :half] = out[:half, half:].T
    return out


class InputStats:
    """Running sum of x^T x (and of |x| per channel when asked) over calibration tokens."""

    def __init__(self, track_abs: bool = False):
        self.sum_xx: torch.Tensor | None = None
        self.sum_abs: torch.Tensor | None = None
        self.count = 0
        self.track_abs = track_abs

    @classmethod
    def from_input(cls, x: torch.Tensor, track_abs: bool = False) -> "InputStats":
        stats = cls(track_abs)
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        g = gram(x)
        self.sum_xx = g if self.sum_xx is None else self.sum_xx.add_(g)
        if self.track_abs:
            a = x.abs().sum(dim=0)
            self.sum_abs = a if self.sum_abs is None else self.sum_abs.add_(a)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n sum x x^T: the Hessian of the layer's squared output error in its weights."""
        return self.sum_xx * (2.0 / self.count)

    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per input channel (AWQ's activation salience)."""
        return self.sum_abs / self.count
