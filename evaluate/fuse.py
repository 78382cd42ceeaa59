"""Run the projections that read the same input as one matmul: q/k/v, and the MLP's gate/up.

Inference engines fuse them (gpt-fast's `wqkv`, vLLM's QKV and merged gate/up layers): a decode
step then launches 4 matrix-vector products per layer instead of 7, and the small k/v products
(a quarter of q's size in Llama-3-8B: launch-bound, far from the copy bandwidth) ride on q's.
The transformers model still calls q_proj, k_proj and v_proj in turn on the same input, so the
first becomes a `FusedProjection` that computes all of them and keeps the later outputs, and the
others become `ProjectionSlice`s that hand those outputs back: the model's code is not touched.
A slice called out of that order fails loudly rather than return a stale output.

Fusable: nn.Linear, and quantized layers whose buffers are laid out [out, ...] (int8, int4, W8A8,
FP8) with the same spec but the output width. Weights that are tensor subclasses (2:4
semi-structured) and groups of mixed kinds stay as they are. A runtime transform for `compress
bench` (`--fuse-projections`), applied to the model being timed; checkpoints keep their layout.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.adapters import adapter_for, set_submodule
from compress.formats.base import QuantizedLinear, drop_kernel_layouts

FUSABLE_FORMATS = ("int8", "int4", "w8a8-int8", "fp8-e4m3")


class _Pending:
    """Outputs computed by a FusedProjection, waiting for the slices that the model calls next."""

    def __init__(self):
        self.outputs: dict[str, torch.Tensor] = {}


class FusedProjection(nn.Module):
    """Stands in for the first projection of a group: one matmul for the whole group, the first
    part returned, the others left for their ProjectionSlices."""

    def __init__(self, fused: nn.Module, names: list[str], widths: list[int], pending: _Pending):
        super().__init__()
        self.fused, self.names, self.widths, self._pending = fused, names, widths, pending
        self.in_features, self.out_features = fused.in_features, widths[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.fused(x).split(self.widths, dim=-1)
        self._pending.outputs = dict(zip(self.names[1:], rest))
        return first

    @property
    def kernel(self) -> str:
        return _label(self.fused, "kernel")

    @property
    def compiled_kernel(self) -> str:
        return _label(self.fused, "compiled_kernel")

    def extra_repr(self) -> str:
        return f"{' + '.join(self.names)}: widths {self.widths}"


class ProjectionSlice(nn.Module):
    """Stands in for a later projection of a fused group: returns the output computed for it."""

    def __init__(self, name: str, first: str, in_features: int, out_features: int,
                 pending: _Pending):
        super().__init__()
        self.name, self.first, self._pending = name, first, pending
        self.in_features, self.out_features = in_features, out_features
        self.kernel = f"computed by {first}'s fused matmul"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._pending.outputs.pop(self.name, None)
        if out is None:
            raise RuntimeError(f"{self.name} ran before {self.first}, whose fused matmul computes "
                               "it: this model calls its projections in another order than the "
                               "fusion assumes; run it without --fuse-projections")
        return out


def _label(module: nn.Module, attribute: str) -> str:
    kernel = getattr(module, attribute, None) or getattr(module, "kernel", None)
    return f"fused: {kernel or 'torch.nn.functional.linear'}"


class FusedProjections:
    """What `fuse_projections` did: `groups` names each fused group ("model.layers.0.self_attn:
    q_proj + k_proj + v_proj"), `undo()` puts the original modules back. They kept their tensors
    as views into the fused ones, so fusing costs no memory and undoing costs no copy: a sweep
    can time its baseline fused, then compress that same model."""

    def __init__(self):
        self.groups: list[str] = []
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []

    def undo(self) -> None:
        for parent, path, module in reversed(self._originals):
            set_submodule(parent, path, module)
        self._originals.clear()


def fuse_projections(model: nn.Module) -> FusedProjections:
    """Fuse q/k/v and gate/up in every decoder layer, in place; groups that cannot be fused are
    left as they are."""
    adapter = adapter_for(model)
    groups = ((adapter.attention, (adapter.q, adapter.k, adapter.v)),
              (adapter.mlp, (adapter.gate, adapter.up)))
    done = FusedProjections()
    for index, layer in enumerate(adapter.layers(model)):
        for parent, names in groups:
            modules = [layer.get_submodule(f"{parent}.{n}") for n in names]
            fused = fuse_linears(modules)
            if fused is None:
                continue
            _share_storage(modules, fused)
            pending = _Pending()
            widths = [m.out_features for m in modules]
            done._originals += [(layer, f"{parent}.{n}", m) for n, m in zip(names, modules)]
            set_submodule(layer, f"{parent}.{names[0]}",
                          FusedProjection(fused, list(names), widths, pending))
            for name, module in zip(names[1:], modules[1:]):
                set_submodule(layer, f"{parent}.{name}", ProjectionSlice(
                    name, names[0], module.in_features, module.out_features, pending))
            done.groups.append(f"{adapter.layers_path}.{index}.{parent}: {' + '.join(names)}")
    return done


def _share_storage(modules: list[nn.Module], fused: nn.Module) -> None:
    """Point every tensor of `modules` at its rows of the fused module's tensor (freeing their
    own storage), and drop kernel layouts built from the old tensors (rebuilt when next used)."""
    start = 0
    for module in modules:
        rows = slice(start, start + module.out_features)
        for name, tensor in fused.named_parameters(recurse=False):
            setattr(module, name, nn.Parameter(tensor[rows], requires_grad=False))
        for name, tensor in fused.named_buffers(recurse=False):
            if tensor is not None:
                module._buffers[name] = tensor[rows]
        drop_kernel_layouts(module)
        start += module.out_features


def fuse_linears(modules: list[nn.Module]) -> nn.Module | None:
    """One layer computing all of `modules` (same input) stacked along the output, or None when
    they are not all of one fusable kind with the same spec but the output width."""
    first = modules[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in modules):
        return None
    if type(first) is nn.Linear:
        weights = [m.weight for m in modules]
        if any(type(w) not in (torch.Tensor, nn.Parameter) for w in weights):
            return None  # tensor subclasses (2:4 semi-structured) do not concatenate
        if any((m.bias is None) != (first.bias is None) for m in modules):
            return None
        fused = nn.Linear(first.in_features, sum(m.out_features for m in modules),
                          bias=first.bias is not None, device=first.weight.device,
                          dtype=first.weight.dtype)
        fused.weight = nn.Parameter(torch.cat(weights), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in modules]), requires_grad=False)
        return fused
    if not isinstance(first, QuantizedLinear) or first.format not in FUSABLE_FORMATS:
        return None
    spec = {k: v for k, v in first.spec().items() if k != "out_features"}
    if any({k: v for k, v in m.spec().items() if k != "out_features"} != spec for m in modules):
        return None
    states = [m.state_dict() for m in modules]
    # The dtype sets the bias (and int8 / int4 scales); W8A8 / FP8 scales are float32 anyway.
    dtype = first.bias.dtype if first.bias is not None else first.scales.dtype
    fused = type(first).from_spec({**spec, "out_features": sum(m.out_features for m in modules)},
                                  dtype)
    fused.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
    return fused.to(first.qweight.device)
