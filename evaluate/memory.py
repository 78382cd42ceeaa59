"""Weight bytes by component, counting each storage once (tied embeddings are shared)."""
from __future__ import annotations

import math

import torch
from torch import nn

from compress.adapters import adapter_for, decoder_linears


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of parameters and persistent buffers: total, embedding, decoder linears, lm_head, other.

    A tensor shared by two modules (tied lm_head) is counted once, under the embedding. Tensor
    subclasses (2:4 semi-structured weights, torchao's quantized ones) count what they store.
    """
    adapter = adapter_for(model)
    prefixes = {"embedding": adapter.embed_path + ".", "lm_head": adapter.lm_head_path + ".",
                "linear": adapter.layers_path + "."}
    linear_names = {f"{name}." for name, _ in decoder_linears(model)}
    out = {"embedding": 0, "linear": 0, "lm_head": 0, "other": 0}
    seen = set()
    for name, tensor in _named_tensors(model):
        stored = [(key, size) for key, size in stored_tensors(tensor) if key not in seen]
        seen.update(key for key, _ in stored)
        size = sum(size for _, size in stored)
        if name.startswith(prefixes["embedding"]):
            out["embedding"] += size
        elif name.startswith(prefixes["lm_head"]):
            out["lm_head"] += size
        elif any(name.startswith(p) for p in linear_names):
            out["linear"] += size
        else:
            out["other"] += size
    out["total"] = sum(out.values())
    return out


def stored_tensors(tensor: torch.Tensor) -> list[tuple[tuple, int]]:
    """(identity, bytes) of each plain tensor that holds `tensor`'s data: the tensor itself, or
    the inner tensors of a tensor subclass, whose own data_ptr is 0 and whose numel and dtype
    describe the logical dense weight, not what is stored. bitsandbytes parameters keep their
    scales beside the codes, as attributes: LLM.int8's row scales (`SCB`), 4-bit's block absmax
    (and its own absmax under double quantization)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [s for n in names for s in stored_tensors(getattr(tensor, n))]
    side = [getattr(tensor, "SCB", None)]
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        side += [state.absmax, getattr(getattr(state, "state2", None), "absmax", None)]
    own = ((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)),
           tensor.numel() * tensor.element_size())
    return [own] + [s for t in side if isinstance(t, torch.Tensor) for s in stored_tensors(t)]


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            yield name, buf


def other_resident_bytes(own_bytes: int, device) -> int | None:
    """Bytes allocated on `device` now beyond a model's `own_bytes` (`weight_bytes(model)`'s
    total): what other models and the process hold (None off CUDA); the process's share is
    cuBLAS's workspace, 32 MiB on an H100.

    The peak a phase measures is process-wide: a sweep keeps its source model on the GPU while
    it times each recipe, so an int4 8B row's peak held the bf16 source's 16 GB too. A row
    records this before it builds anything and subtracts it from its peaks (`model_peak`).
    """
    if torch.device(device).type != "cuda":
        return None
    return max(torch.cuda.memory_allocated(device) - own_bytes, 0)


def model_peak(peak: int | None, other_resident: int | None) -> int | None:
    """A phase's peak less what other models held: the model's weights, its kernel layouts,
    KV cache and activations."""
    return None if peak is None or other_resident is None else peak - other_resident


def parameter_count(model: nn.Module) -> int:
    """Logical parameters: float parameters plus the weights that quantized layers encode. A
    2:4 linear that keeps its weight in two forms (SemiStructuredLinear) counts it once."""
    from compress.formats.base import QuantizedLinear

    seen, count = set(), 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            count += module.in_features * module.out_features
        # The 2:4 form of a weight that is also kept dense: the same parameters (an H100 row
        # of the Llama-3-8B shape counted 13.7 billion).
        second_form = getattr(module, "sparse_weight", None)
        for param in module.parameters(recurse=False):
            if param is second_form:
                continue
            if id(param) not in seen:
                seen.add(id(param))
                count += _logical_numel(param)
    return count


def _logical_numel(param: torch.Tensor) -> int:
    """Elements a parameter stands for: bitsandbytes' 4-bit Params4bit stores two codes per byte
    (numel counts bytes), its quant_state keeps the weight's shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else param.numel()
