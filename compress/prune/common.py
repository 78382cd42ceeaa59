"""Helpers shared by the pruning passes: which linears share an input, the reached-sparsity
report attached to the model, and the structured-pruning bookkeeping."""
from __future__ import annotations

import torch
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


# Reports a checkpoint keeps in its compress.json: what its weights are, not how long it took.
SAVED_REPORTS = ("sparsity", "structured")


def attach_report(model: nn.Module, key: str, report: dict) -> None:
    """Store a pass's report on the model; compress.pipeline merges it into the results metrics.
    A second structured pass keeps the earlier ones under `earlier_passes`."""
    existing = dict(getattr(model, "compress_report", None) or {})
    if key == "structured" and key in existing:
        earlier = dict(existing[key])
        report = dict(report, earlier_passes=[*earlier.pop("earlier_passes", []), earlier])
    existing[key] = report
    model.compress_report = existing


def saved_reports(model: nn.Module) -> dict:
    report = getattr(model, "compress_report", None) or {}
    return {key: report[key] for key in SAVED_REPORTS if key in report}


def was_pruned(model: nn.Module) -> bool:
    """Whether a sparsity pass ran on this model (in this recipe, or on the checkpoint it was
    loaded from): its exact zeros are a pattern to keep, not incidental."""
    return "sparsity" in (getattr(model, "compress_report", None) or {})


def check_not_sparse(model: nn.Module, method: str) -> None:
    """Structured passes choose and refit whole rows and columns of dense weights; after a
    sparsity pass they would refill its zeros (the least-squares refit) and cut its N:M groups."""
    if was_pruned(model):
        raise UserError(f"{method} after a sparsity pass would break its zeros; put structured "
                        "pruning (mlp-channels, heads) before magnitude / wanda / sparsegpt")


def refresh_sparsity(model: nn.Module) -> None:
    """Recount the zeros of a pruned model after every pass of its recipe (a later pass, such
    as dropping layers or quantizing, changes what the sparsity pass reported); quantized
    linears are counted on their dequantized weights, where a kept zero is exactly zero."""
    report = (getattr(model, "compress_report", None) or {}).get("sparsity")
    if report is None:
        return
    adapter = adapter_for(model)
    weights = {name: (linear.weight.data if isinstance(linear, nn.Linear)
                      else linear.dequantize(torch.float32))
               for name, linear in decoder_linears(model)}
    labels = {k: report[k] for k in ("method", "pattern", "target_per_layer") if k in report}
    attach_report(model, "sparsity", {**sparsity_report(weights, layer_of(adapter)), **labels})


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
