"""Structured pruning passes that really shrink the model: `mlp-channels`, `heads`, `layers`.

Tensors are sliced to their new shapes and model.config is updated, so a checkpoint reloads with
stock transformers when every layer has the same shape, and with compress.checkpoint always
(per-layer shapes go into compress.json). Units are ranked on calibration data streamed through
compress.calibration.run_layerwise, so later layers are pruned on already-pruned inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compress.adapters import adapter_for, set_submodule
from compress.calibration import collect_linear_inputs, full_precision, run_layerwise
from compress.errors import UserError, check_number
from compress.evaluate.memory import parameter_count
from compress.passes import register_pass
from compress.prune import shrink
from compress.prune.common import attach_report, check_not_sparse, float_linears
from compress.prune.sparsegpt import accumulate_hessian

CRITERIA = ("activation", "magnitude")
SCOPES = ("layer", "global")
HEAD_MODES = ("kv-groups", "query")


def _check(value, allowed, field):
    if value not in allowed:
        raise UserError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass
class MLPChannelsConfig:
    ratio: float = 0.25             # fraction of intermediate channels removed
    criterion: str = "activation"   # activation: H_jj * ||W_down[:, j]||^2; magnitude: weights only
    reconstruct: bool = True        # least-squares re-fit of down_proj on the kept channels
    scope: str = "layer"            # layer: same width everywhere; global: rank across layers
    damp: float = 0.01

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        _check(self.criterion, CRITERIA, "criterion")
        check_number("damp", self.damp, 0)
        _check(self.scope, SCOPES, "scope")


@dataclass
class HeadsConfig:
    ratio: float = 0.25             # fraction of KV groups (kv-groups) or of query heads per group
    mode: str = "kv-groups"         # kv-groups: whole KV heads with their queries; query: the
                                    # same number of query heads in every group
    reconstruct: bool = True        # least-squares re-fit of o_proj on the kept heads
    damp: float = 0.01

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}")
        _check(self.mode, HEAD_MODES, "mode")
        check_number("damp", self.damp, 0)


@dataclass
class DropLayersConfig:
    drop: int = 4                   # decoder layers removed, lowest block influence first

    def __post_init__(self):
        if self.drop < 1:
            raise UserError(f"drop must be at least 1, got {self.drop}")


def _input_hessian(layer: nn.Module, name: str, forward) -> torch.Tensor:
    state = {}

    def add(_, x):
        state["h"], state["n"] = accumulate_hessian(state.get("h"), state.get("n", 0), x)

    collect_linear_inputs({name: layer.get_submodule(name)}, forward, add)
    return state["h"]


def _layer_stats(model, calib, measure, desc):
    """One layer-by-layer pass over the (unchanged) model: measure(index, layer, forward)."""
    run_layerwise(model, calib.samples, measure, calib.device, calib.batch_size, desc,
                  compute_dtype=calib.compute_dtype)


# ----- MLP channels -----------------------------------------------------------------------------

@register_pass("mlp-channels", MLPChannelsConfig, needs_calibration=True, kind="prune")
@torch.no_grad()
def mlp_channels(model: nn.Module, config: MLPChannelsConfig, calib) -> nn.Module:
    float_linears(model)
    check_not_sparse(model, "mlp-channels")
    if calib is None:
        raise UserError("mlp-channels needs calibration samples")
    a = adapter_for(model)
    gate, up, down = (f"{a.mlp}.{n}" for n in (a.gate, a.up, a.down))
    layers = a.layers(model)
    before = parameter_count(model)
    widths = [layer.get_submodule(down).in_features for layer in layers]
    if config.scope == "layer":
        keep_counts = [w - int(round(config.ratio * w)) for w in widths]
    else:
        scores = [None] * len(layers)

        def measure(index, layer, forward):
            w = layer.get_submodule(down).weight
            scores[index] = (shrink.column_energy(w, _input_hessian(layer, down, forward))
                             if config.criterion == "activation" else w.float().pow(2).sum(0))

        if config.criterion == "activation":
            _layer_stats(model, calib, measure, "mlp stats")
        else:
            for index, layer in enumerate(layers):
                measure(index, layer, None)
        keep_counts = shrink.global_keep_counts(scores, config.ratio,
                                                min_keep=max(1, min(widths) // 8))
    if min(keep_counts) < 1:
        raise UserError(f"ratio {config.ratio} leaves no MLP channel in some layer")
    if all(k == w for k, w in zip(keep_counts, widths)):
        # round(ratio * width) >= 1 needs ratio * width > 0.5 (round(0.5) is 0): for the widest
        # layer (scope layer) or all channels together (scope global); 2 digits, rounded up.
        least = 0.5 / (max(widths) if config.scope == "layer" else sum(widths))
        digits = 1 - math.floor(math.log10(least))
        raise UserError(f"ratio {config.ratio} removes no MLP channel (widths "
                        f"{min(widths)}-{max(widths)}); allowed: a ratio of at least "
                        f"{math.floor(least * 10 ** digits + 1) / 10 ** digits:g}")
    removed_by_layer = {}

    def prune_layer(index, layer, forward):
        w_down = layer.get_submodule(down).weight.data
        need_h = config.criterion == "activation" or config.reconstruct
        h = _input_hessian(layer, down, forward) if need_h else None
        scores = (shrink.column_energy(w_down, h) if config.criterion == "activation"
                  else w_down.float().pow(2).sum(0))
        removed = shrink.lowest(scores, widths[index] - keep_counts[index])
        keep = shrink.keep_indices(widths[index], removed)
        new_down = shrink.compensate(w_down, h, keep, config.damp) if config.reconstruct else None
        set_submodule(layer, gate, shrink.slice_linear(layer.get_submodule(gate), rows=keep))
        set_submodule(layer, up, shrink.slice_linear(layer.get_submodule(up), rows=keep))
        set_submodule(layer, down, shrink.slice_linear(layer.get_submodule(down), cols=keep,
                                                       weight=new_down))
        mlp = layer.get_submodule(a.mlp)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
        removed_by_layer[index] = len(removed)

    run_layerwise(model, calib.samples, prune_layer, calib.device, calib.batch_size, "mlp-channels",
                  compute_dtype=calib.compute_dtype)
    # The config holds one width; with per-layer widths it holds the widest, and compress.json
    # records the exact shape of every linear that differs (compress.checkpoint).
    model.config.intermediate_size = max(keep_counts)
    attach_report(model, "structured", {
        "method": "mlp-channels", "ratio": config.ratio, "scope": config.scope,
        "intermediate_per_layer": keep_counts, "removed_per_layer": [
            removed_by_layer[i] for i in range(len(layers))],
        "parameters_before": before, "parameters_after": parameter_count(model)})
    return model


# ----- attention heads --------------------------------------------------------------------------

@register_pass("heads", HeadsConfig, needs_calibration=True, kind="prune")
@torch.no_grad()
def heads(model: nn.Module, config: HeadsConfig, calib) -> nn.Module:
    float_linears(model)
    check_not_sparse(model, "heads")
    a = adapter_for(model)
    q, k, v, o = (f"{a.attention}.{n}" for n in (a.q, a.k, a.v, a.o))
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    group = n_heads // n_kv
    if config.mode == "kv-groups":
        remove_kv, remove_q = int(round(config.ratio * n_kv)), 0
        if not 1 <= remove_kv < n_kv:
            raise UserError(f"ratio {config.ratio} removes {remove_kv} of {n_kv} KV groups; "
                            f"allowed: {_ratio_steps(n_kv, 'KV groups')}")
    else:
        remove_kv, remove_q = 0, int(round(config.ratio * group))
        if not 1 <= remove_q < group:
            raise UserError(f"ratio {config.ratio} removes {remove_q} of {group} query heads per "
                            f"KV group; allowed: {_ratio_steps(group, 'query heads per group')}")
    before = parameter_count(model)
    removed_by_layer = {}

    def prune_layer(index, layer, forward):
        h = _input_hessian(layer, o, forward)
        energy = shrink.head_energy(layer.get_submodule(o).weight.data, h, head_dim)
        if config.mode == "kv-groups":
            kv_removed = shrink.lowest(energy.view(n_kv, group).sum(1), remove_kv)
            kv_keep = shrink.keep_indices(n_kv, kv_removed)
            q_keep = (kv_keep[:, None] * group + torch.arange(group)[None, :]).flatten()
            removed = kv_removed.tolist()
        else:
            kv_keep = torch.arange(n_kv)
            per_group = energy.view(n_kv, group)
            q_keep = torch.cat([g * group + shrink.keep_indices(group, shrink.lowest(
                per_group[g], remove_q)) for g in range(n_kv)])
            removed = sorted(set(range(n_heads)) - set(q_keep.tolist()))
        q_cols = shrink.head_columns(q_keep, head_dim)
        kv_rows = shrink.head_columns(kv_keep, head_dim)
        w_o = layer.get_submodule(o).weight.data
        new_o = shrink.compensate(w_o, h, q_cols, config.damp) if config.reconstruct else None
        set_submodule(layer, q, shrink.slice_linear(layer.get_submodule(q), rows=q_cols))
        set_submodule(layer, k, shrink.slice_linear(layer.get_submodule(k), rows=kv_rows))
        set_submodule(layer, v, shrink.slice_linear(layer.get_submodule(v), rows=kv_rows))
        set_submodule(layer, o, shrink.slice_linear(layer.get_submodule(o), cols=q_cols,
                                                    weight=new_o))
        attention = layer.get_submodule(a.attention)
        # Attention reads head counts from tensor shapes, except the KV repeat factor.
        attention.num_key_value_groups = len(q_keep) // len(kv_keep)
        removed_by_layer[index] = removed

    run_layerwise(model, calib.samples, prune_layer, calib.device, calib.batch_size, "heads",
                  compute_dtype=calib.compute_dtype)
    cfg.head_dim = head_dim  # hidden_size // heads no longer gives it
    cfg.num_attention_heads = n_heads - remove_kv * group - remove_q * n_kv
    cfg.num_key_value_heads = n_kv - remove_kv
    attach_report(model, "structured", {
        "method": "heads", "mode": config.mode, "ratio": config.ratio,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "removed_per_layer": [removed_by_layer[i] for i in sorted(removed_by_layer)],
        "parameters_before": before, "parameters_after": parameter_count(model)})
    return model


# ----- whole layers -----------------------------------------------------------------------------

def block_influences(model: nn.Module, calib) -> list[float]:
    """Mean over calibration tokens of 1 - cos(layer input, layer output), per decoder layer,
    measured on the unpruned model (ShortGPT, Men et al. 2024)."""
    influence = []

    def measure(index, layer, forward):
        totals = [0.0, 0]

        @full_precision
        def hook(_module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            s, n = shrink.block_influence(x_in, x_out)
            totals[0] += s
            totals[1] += n

        handle = layer.register_forward_hook(hook, with_kwargs=True)
        try:
            forward()
        finally:
            handle.remove()
        influence.append(totals[0] / max(totals[1], 1))

    _layer_stats(model, calib, measure, "block influence")
    return influence


def drop_layers(model: nn.Module, indices: list[int]) -> nn.Module:
    """Remove decoder layers in place; renumber attention layer_idx (the KV cache slot) and
    update config.num_hidden_layers (and layer_types when the config has it)."""
    a = adapter_for(model)
    layers = a.layers(model)
    drop = set(indices)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    set_submodule(model, a.layers_path, nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        attention = layer.get_submodule(a.attention)
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    cfg = model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]
    cfg.num_hidden_layers = len(kept)
    if kept and getattr(cfg, "intermediate_size", None) is not None:
        # Per-layer MLP widths (mlp-channels, scope global): the config holds the widest kept one,
        # so kept layers that share one width reload with stock transformers.
        cfg.intermediate_size = max(layer.get_submodule(f"{a.mlp}.{a.down}").in_features
                                    for layer in kept)
    sparsity = (getattr(model, "compress_report", None) or {}).get("sparsity")
    if sparsity and len(sparsity.get("target_per_layer") or []) == len(layers):
        # An earlier sparsity pass's per-layer targets follow their layers, as the recount does.
        attach_report(model, "sparsity", dict(sparsity, target_per_layer=[
            t for i, t in enumerate(sparsity["target_per_layer"]) if i not in drop]))
    return model


@register_pass("layers", DropLayersConfig, needs_calibration=True, kind="prune")
@torch.no_grad()
def layers(model: nn.Module, config: DropLayersConfig, calib) -> nn.Module:
    a = adapter_for(model)
    total = len(a.layers(model))
    if config.drop >= total:
        raise UserError(f"drop {config.drop} leaves no decoder layer of the model's {total}; "
                        f"allowed: 1 to {total - 1}")
    before = parameter_count(model)
    influence = block_influences(model, calib)
    dropped = sorted(shrink.lowest(torch.tensor(influence), config.drop).tolist())
    drop_layers(model, dropped)
    attach_report(model, "structured", {
        "method": "layers", "dropped": dropped, "num_hidden_layers": total - config.drop,
        "block_influence": [round(x, 6) for x in influence],
        "parameters_before": before, "parameters_after": parameter_count(model)})
    return model


def _ratio_steps(count: int, units: str) -> str:
    """The ratios that remove 1 to count - 1 of `count` units, for error messages."""
    if count < 2:
        return f"none, there is only {count} of the {units}"
    if count == 2:
        return f"ratio 0.5 (1 of 2 {units})"
    return (f"ratio {1 / count:.3g} to {(count - 1) / count:.3g}, in steps of {1 / count:.3g} "
            f"(1 to {count - 1} of {count} {units})")
