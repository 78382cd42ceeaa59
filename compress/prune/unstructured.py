"""Unstructured and N:M pruning passes: `magnitude`, `wanda`, `sparsegpt`.

Each pass picks per-layer sparsities (uniform or OWL), chooses masks with compress.prune.masks or
compress.prune.sparsegpt, and materializes them as dense zeros. Calibrated passes stream the
calibration samples through compress.calibration.run_layerwise, so every layer is pruned on the
outputs of the already-pruned layers before it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from compress.adapters import adapter_for
from compress.calibration import collect_linear_inputs, full_precision, run_layerwise
from compress.errors import UserError, check_number
from compress.passes import register_pass
from compress.prune import masks
from compress.prune.common import float_linears, input_groups, report_sparsity
from compress.prune.sparsegpt import accumulate_hessian, sparsegpt_prune


@dataclass
class SparsityConfig:
    """Fields every unstructured/N:M pass shares."""

    sparsity: float | None = None   # None: 0.5 unstructured; 1 - N/M for an N:M pattern
    pattern: str = "unstructured"   # unstructured, or N:M such as 2:4, 4:8
    profile: str = "uniform"        # uniform, or owl (outlier-weighted per-layer sparsity)
    owl_threshold: float = 5.0      # OWL: a score is an outlier above this times the layer mean
    owl_lambda: float = 0.08        # OWL: per-layer sparsities spread over +-lambda

    def __post_init__(self):
        nm = masks.parse_pattern(self.pattern)
        if nm is not None:   # one spelling per pattern: 02:04 is 2:4 (name, resolved recipe, hash)
            self.pattern = f"{nm[0]}:{nm[1]}"
        check_number("owl_threshold", self.owl_threshold, 0, strict=True)
        masks.check_owl_lambda(self.owl_lambda)   # here, not after the calibration forwards
        if self.profile not in masks.PROFILES:
            raise UserError(f"profile must be one of {', '.join(masks.PROFILES)}; "
                            f"got {self.profile!r}")
        if self.profile == "uniform":
            _refuse_changed(self, ("owl_threshold", "owl_lambda"), "with profile uniform "
                            "(they shape OWL's per-layer sparsities: add profile: owl)")
        if nm is None:
            self.sparsity = 0.5 if self.sparsity is None else self.sparsity
            masks.check_sparsity(self.sparsity)
            return
        implied = 1 - nm[0] / nm[1]
        if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
            raise UserError(f"pattern {self.pattern} implies sparsity {implied}; got sparsity "
                            f"{self.sparsity} (leave it out)")
        if self.profile != "uniform":
            raise UserError(f"profile {self.profile!r} needs pattern unstructured; N:M fixes "
                            "every layer's sparsity; allowed with N:M: uniform")
        self.sparsity = implied

    def nm(self):
        return masks.parse_pattern(self.pattern)


@dataclass
class MagnitudeConfig(SparsityConfig):
    scope: str = "layer"            # compare weights within each matrix (layer) or each row

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in masks.SCOPES:
            raise UserError(f"scope must be one of {', '.join(masks.SCOPES)}; got {self.scope!r}")
        if self.nm() is not None:
            _refuse_changed(self, ("scope",), f"with pattern {self.pattern} (N:M keeps "
                            "its n of every m columns of each row whatever the scope)")


def _refuse_changed(config, names, why: str) -> None:
    """A field the config's other settings make unused may only keep its default."""
    defaults = {f.name: f.default for f in fields(config)}
    for name in names:
        if getattr(config, name) != defaults[name]:
            raise UserError(f"{name} {getattr(config, name)!r} has no effect {why}; leave it out")


@dataclass
class WandaConfig(MagnitudeConfig):
    # Wanda compares weights within each output row; row-mass: the variant of the Wanda code
    # (per-row counts from a shared share of each row's score mass; sparsity within 0.1%).
    scope: str = "row"
    # False (the paper's schedule): every linear's statistics come from one pass of the layer
    # before any of it is pruned. True: one forward with all samples in one batch, each group
    # (q/k/v, o, gate/up, down) pruned as the forward reaches it, so o_proj is chosen on the
    # outputs of the pruned q/k/v, and so on; one forward per layer instead of two.
    sequential: bool = False


@dataclass
class SparseGPTConfig(SparsityConfig):
    blocksize: int = 128            # columns per lazy-update block
    damp: float = 0.01              # dampening, as a fraction of mean(diag H)
    sequential: bool = False        # as WandaConfig.sequential

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize < 1:
            raise UserError(f"blocksize must be >= 1; got {self.blocksize}")
        check_number("damp", self.damp, 0)
        nm = masks.parse_pattern(self.pattern)
        if nm is not None and self.blocksize % nm[1]:
            raise UserError(f"pattern {self.pattern} needs a blocksize that is a multiple of "
                            f"{nm[1]}; got {self.blocksize}")


# ----- statistics -------------------------------------------------------------------------------

def _group_stats(layer: nn.Module, groups, forward, accumulate) -> dict:
    """Stream the samples through `layer` once; `accumulate(state, x)` per shared-input group."""
    state = {}

    def add(name, x):
        state[name] = accumulate(state.get(name), x)

    collect_linear_inputs({g[0]: layer.get_submodule(g[0]) for g in groups}, forward, add)
    return state


def _sq_norms(acc, x):
    x = x.float()
    total = x.pow(2).sum(0)
    return total if acc is None else acc + total


def _hessian(acc, x):
    h, count = acc if acc is not None else (None, 0)
    return accumulate_hessian(h, count, x)


def _profile(model, config: SparsityConfig, calib, weighted: bool) -> list[float]:
    """Per-layer sparsities. OWL's outlier ratios come from the dense model: for calibrated
    methods one extra layer-by-layer pass measures Wanda scores before anything is pruned."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    if config.profile == "uniform":
        return masks.uniform_profile(len(layers), config.sparsity)
    groups = input_groups(adapter)
    ratios = [0.0] * len(layers)

    def measure(index, layer, forward):
        norms = _group_stats(layer, groups, forward, _sq_norms) if weighted else {}
        scores = [masks.wanda_scores(layer.get_submodule(n).weight, norms[g[0]]) if weighted
                  else masks.magnitude_scores(layer.get_submodule(n).weight)
                  for g in groups for n in g]
        ratios[index] = masks.outlier_ratio(scores, config.owl_threshold)

    if weighted:
        run_layerwise(model, calib.samples, measure, calib.device, calib.batch_size, "owl stats",
                      compute_dtype=calib.compute_dtype)
    else:
        for index, layer in enumerate(layers):
            measure(index, layer, None)
    return masks.owl_profile(ratios, config.sparsity, config.owl_lambda)


def _run_pruning(model, config, calib, groups, prune_group, accumulate,
                 desc: str) -> None:
    """Stream the calibration samples layer by layer; `prune_group(index, layer, names, stat)`
    prunes one group of linears of layer `index` given the statistic of their shared input
    (`accumulate`d over its tokens)."""

    def prune_layer(index, layer, forward):
        if config.sequential:
            return _prune_in_one_forward(index, layer, groups, forward, prune_group, accumulate)
        stats = _group_stats(layer, groups, forward, accumulate)
        for group in groups:
            prune_group(index, layer, group, stats[group[0]])
        return None

    batch = len(calib.samples) if config.sequential else calib.batch_size
    run_layerwise(model, calib.samples, prune_layer, calib.device, batch, desc,
                  compute_dtype=calib.compute_dtype)


def _prune_in_one_forward(index, layer, groups, forward, prune_group, accumulate):
    """Prune each group from a pre-hook as the single forward (all samples in one batch) reaches
    it: the group's linears run already pruned, so everything after them sees pruned inputs and
    the outputs are those of the pruned layer (the driver needs no second forward)."""
    done = set()

    @full_precision
    def hook(names, x):
        if names[0] in done:
            raise RuntimeError("sequential pruning expects one batch per layer forward")
        done.add(names[0])
        prune_group(index, layer, names, accumulate(None, x.reshape(-1, x.shape[-1])))

    handles = [layer.get_submodule(names[0]).register_forward_pre_hook(
        lambda _m, args, names=names: hook(names, args[0])) for names in groups]
    try:
        return forward()
    finally:
        for handle in handles:
            handle.remove()


# ----- passes -----------------------------------------------------------------------------------

@register_pass("magnitude", MagnitudeConfig, needs_calibration=False, kind="prune")
@torch.no_grad()
def magnitude(model: nn.Module, config: MagnitudeConfig, calib=None) -> nn.Module:
    float_linears(model)
    adapter = adapter_for(model)
    targets = _profile(model, config, calib, weighted=False)
    for index, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names():
            weight = layer.get_submodule(name).weight
            keep = masks.select_mask(masks.magnitude_scores(weight), targets[index],
                                     config.pattern, config.scope)
            weight.mul_(keep.to(weight.dtype))
    report_sparsity(model, "magnitude", config.pattern, targets)
    return model


@register_pass("wanda", WandaConfig, needs_calibration=True, kind="prune")
@torch.no_grad()
def wanda(model: nn.Module, config: WandaConfig, calib) -> nn.Module:
    float_linears(model)
    adapter = adapter_for(model)
    groups = input_groups(adapter)
    targets = _profile(model, config, calib, weighted=True)

    def prune_group(index, layer, group, sq_norms):
        for name in group:
            weight = layer.get_submodule(name).weight
            scores = masks.wanda_scores(weight, sq_norms.to(weight.device))
            keep = masks.select_mask(scores, targets[index], config.pattern, config.scope)
            weight.mul_(keep.to(weight.dtype))

    _run_pruning(model, config, calib, groups, prune_group, _sq_norms, "wanda")
    report_sparsity(model, "wanda", config.pattern, targets)
    return model


@register_pass("sparsegpt", SparseGPTConfig, needs_calibration=True, kind="prune")
@torch.no_grad()
def sparsegpt(model: nn.Module, config: SparseGPTConfig, calib) -> nn.Module:
    float_linears(model)
    adapter = adapter_for(model)
    groups = input_groups(adapter)
    targets = _profile(model, config, calib, weighted=True)

    def prune_group(index, layer, group, hessian):
        # Matrices sharing an input share H: stack their rows and prune them in one call.
        weights = [layer.get_submodule(name).weight for name in group]
        pruned, _ = sparsegpt_prune(torch.cat([w.data for w in weights]), hessian[0],
                                    targets[index], config.nm(), config.blocksize, config.damp,
                                    row_groups=[w.shape[0] for w in weights])
        for weight, part in zip(weights, pruned.split([w.shape[0] for w in weights])):
            weight.copy_(part)

    _run_pruning(model, config, calib, groups, prune_group, _hessian, "sparsegpt")
    report_sparsity(model, "sparsegpt", config.pattern, targets)
    return model
