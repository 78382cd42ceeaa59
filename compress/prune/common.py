"""Helpers shared by the pruning passes: which linears share an input, the reached-sparsity
report attached to the model, and the structured-pruning bookkeeping."""
from __future__ import annotations

from torch import nn

from compress.adapters import Adapter, adapter_for, decoder_linears
from compress.errors import UserError
from compress.prune.masks import sparsity_report


def input_groups(adapter: Adapter) -> list[tuple[str, ...]]:
    """Linears of one decoder layer grouped by shared input (relative names, execution order).

    One statistic (input norms, Hessian) per group is enough: q/k/v read the same normed hidden
    state, gate/up the same post-attention one.
    """
    a, m = adapter.attention, adapter.mlp
    return [(f"{a}.{adapter.q}", f"{a}.{adapter.k}", f"{a}.{adapter.v}"), (f"{a}.{adapter.o}",),
            (f"{m}.{adapter.gate}", f"{m}.{adapter.up}"), (f"{m}.{adapter.down}",)]


def float_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every decoder linear, after checking it is still a float nn.Linear (prune, then quantize)."""
    linears = decoder_linears(model)
    for name, linear in linears:
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{name} is already compressed ({type(linear).__name__}); pruning "
                            "needs float nn.Linear layers: put pruning passes before quantization")
    return linears


def attach_report(model: nn.Module, key: str, report: dict) -> None:
    """Store a pass's report on the model; compress.pipeline merges it into the results metrics."""
    existing = dict(getattr(model, "compress_report", None) or {})
    existing[key] = report
    model.compress_report = existing


def layer_of(adapter: Adapter):
    """name -> decoder layer index (as a string) for names under the layer list."""
    depth = len(adapter.layers_path.split("."))
    return lambda name: name.split(".")[depth]


def report_sparsity(model: nn.Module, method: str, pattern: str, targets: list[float]) -> dict:
    adapter = adapter_for(model)
    weights = {name: linear.weight.data for name, linear in float_linears(model)}
    report = sparsity_report(weights, layer_of(adapter))
    report.update(method=method, pattern=pattern,
                  target_per_layer=[round(t, 6) for t in targets])
    attach_report(model, "sparsity", report)
    return report
