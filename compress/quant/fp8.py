"""FP8 W8A8 pass (`fp8`): e4m3 weights per output channel, e4m3 activations per token, dynamic.

Where it runs: the weights are rounded the same way on any device, so the pass always writes a
valid checkpoint, and the CPU reference forward measures its quality exactly. Speed needs FP8
tensor cores (CUDA compute capability >= 8.9); a model placed on an older CUDA GPU is refused at
pass time, because there every layer would silently fall back to the slow reference.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.adapters import set_submodule
from compress.errors import UserError
from compress.formats.fp8 import MIN_CAPABILITY, FP8Linear, fp8_capable
from compress.passes import register_pass
from compress.quant.rtn import check_widths


@dataclass
class FP8Config:
    pass    # nothing to choose: e4m3, per-channel weight scales, dynamic per-token activations


def check_fp8_device(device) -> None:
    """Refuse CUDA devices without FP8 tensor cores; CPU (reference path) is allowed."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and not fp8_capable(device):
        major, minor = torch.cuda.get_device_capability(device)
        need = ".".join(map(str, MIN_CAPABILITY))
        raise UserError(f"fp8 needs a CUDA GPU of compute capability >= {need} (Ada, Hopper or "
                        f"later); {torch.cuda.get_device_name(device)} has {major}.{minor}; "
                        f"allowed: such a GPU, or --device cpu for the (slow) reference path")


@register_pass("fp8", FP8Config)
def fp8(model: nn.Module, config: FP8Config, calib=None) -> nn.Module:
    check_fp8_device(next(model.parameters()).device)
    for name, linear in check_widths(model, 0):
        set_submodule(model, name, FP8Linear.from_float(linear))
    return model
