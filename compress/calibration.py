"""One layer-by-layer calibration driver for every calibrated pass (GPTQ, AWQ, SmoothQuant, Wanda,
SparseGPT).

It catches the inputs of decoder layer 0 once, then for each layer: moves it to the compute
device, lets the pass calibrate and compress it (the pass registers its own hooks and calls
`forward()` to stream the calibration samples through the layer), and re-runs the compressed
layer so the next layer sees compressed outputs. Layers, and the hidden states between them,
wait on the model's device (the CPU when compressing a model larger than the GPU), so peak
accelerator memory is about one layer plus one calibration batch's activations.

With a compute dtype (CalibrationSettings.dtype), the layer forwards run under autocast, as GPU
toolkits calibrate an fp16 model, while every hook's statistics and compression math stay in
float32 (`full_precision`).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapters import adapter_for
from compress.errors import UserError

@dataclass
class CalibrationData:
    """What a calibrated pass receives: token samples [n, seq_len] and how to stream them."""

    samples: torch.Tensor
    batch_size: int = 8
    device: str | None = None     # compute device for one layer at a time; None: the model's
    compute_dtype: torch.dtype | None = None  # autocast for layer forwards; None: weights' own


# compress_layer(index, layer, forward) -> None or outputs; `forward()` runs every sample
# through `layer` and returns its outputs (one tensor per batch). A pass whose last forward()
# already ran the compressed layer may return those outputs to spare the driver's re-run.
LayerFn = Callable[[int, nn.Module, Callable[[], list]], "list[torch.Tensor] | None"]


class _CaughtInputs(Exception):
    """Raised by the hook on layer 0 to stop the forward once its inputs are caught."""


def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, device: torch.device,
                         batch_size: int, park: torch.device | None = None
                         ) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 (one tensor per batch, kept on `park`, default
    `device`) and the layer's kwargs for the first (full) batch; `batch_kwargs` fits them to a
    shorter last batch."""
    adapter = adapter_for(model)
    kinds = sorted(set(getattr(model.config, "layer_types", None) or []))
    if len(kinds) > 1:
        # The layers' kwargs are caught at layer 0 and serve every layer: a sliding-window layer
        # would run with layer 0's full causal mask and calibrate on the wrong activations.
        raise UserError(f"calibration supports models whose layers share one attention mask; "
                        f"this one mixes {', '.join(kinds)} layers")
    first = adapter.layers(model)[0]
    inputs, kwargs_seen = [], {}

    def catch(_module, args, kwargs):
        inputs.append((args[0] if args else kwargs.pop("hidden_states")).to(park or device))
        if not kwargs_seen:  # one set serves every batch: no padding, shared positions
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _CaughtInputs

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with _pre_layer_modules_on(model, device):
            for batch in samples.split(batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _CaughtInputs:
                    pass
    finally:
        handle.remove()
    # Caches are not wanted while calibrating; every batch shares positions (no padding).
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("cache", None)  # the name since transformers 5.2x
    kwargs_seen["use_cache"] = False
    return inputs, kwargs_seen


@torch.no_grad()
def run_layerwise(model: nn.Module, samples: torch.Tensor, compress_layer: LayerFn,
                  device: str | torch.device | None = None, batch_size: int = 8,
                  desc: str = "layers", compute_dtype: torch.dtype | None = None
                  ) -> list[torch.Tensor]:
    """Compress every decoder layer in order; returns the final hidden states (per batch).

    `compute_dtype` (bfloat16 / float16): the layer forwards run under autocast to it, so the
    linears and attention compute in it. Hooks must then wrap their math in `full_precision`."""
    device = torch.device(device or next(model.parameters()).device)
    offload = next(model.parameters()).device
    # When the model waits on another device (a model larger than the GPU), the hidden states
    # between layers wait there too and visit the compute device one calibration batch at a
    # time: for Llama-3-8B on 128 x 2048 tokens they are 2.1 GB in bf16, each way.
    hidden, kwargs = capture_layer_inputs(model, samples, device, batch_size, park=offload)
    layers = adapter_for(model).layers(model)
    full = hidden[0].shape[0]
    for index in tqdm(range(len(layers)), desc=desc, leave=False):
        layer = layers[index].to(device)

        def forward(layer=layer):
            with _autocast(device, compute_dtype):
                return [_first(layer(h.to(device), **batch_kwargs(kwargs, h.shape[0], full)))
                        .to(offload, h.dtype) for h in hidden]

        outputs = compress_layer(index, layer, forward)
        hidden = outputs if outputs is not None else forward()
        layers[index] = layer.to(offload)
    return hidden


def batch_kwargs(kwargs: dict, rows: int, full: int) -> dict:
    """The first batch's layer kwargs for a batch of `rows` samples: per-sample tensors (an eager
    attention mask [full, 1, seq, seq]) cut to `rows`; shared ones ([1, ...] positions) as is."""
    if rows == full:
        return kwargs
    return {k: v[:rows] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == full
            else v for k, v in kwargs.items()}


def collect_linear_inputs(modules: dict[str, nn.Module], forward: Callable[[], None],
                          accumulate: Callable[[str, torch.Tensor], None]) -> None:
    """Run `forward()` once with hooks that pass each module's 2-D input to `accumulate`."""
    accumulate = full_precision(accumulate)
    handles = [module.register_forward_pre_hook(
        lambda _m, args, name=name: accumulate(name, args[0].reshape(-1, args[0].shape[-1])))
        for name, module in modules.items()]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()


def full_precision(hook: Callable) -> Callable:
    """`hook` with autocast off: a hook runs inside the layer's forward, and under bfloat16
    autocast its matmuls would run in bfloat16 too. A Gram matrix computed so is not even positive
    semi-definite (GPTQ's Cholesky failed on SmolLM2's first layer); GPTQ's and SparseGPT's error
    updates would lose their precision the same way."""
    @functools.wraps(hook)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return hook(*args, **kwargs)
    return run


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _pre_layer_modules_on(model: nn.Module, device: torch.device):
    """Embeddings and rotary tables on the compute device while catching layer-0 inputs."""
    adapter = adapter_for(model)
    moved = [model.get_submodule(p) for p in (adapter.embed_path, adapter.rotary_path)]
    homes = [next(m.parameters(), next(m.buffers(), None)).device for m in moved]
    for module in moved:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(moved, homes):
            module.to(home)


@contextmanager
def one_cpu_thread(device: torch.device):
    """For the column loops of GPTQ and SparseGPT: thousands of tiny ops, and on CPU every op
    waits for all OpenMP threads, which on a shared machine costs milliseconds each; one thread
    is 10-30x faster there (the per-block matmuls are too small to win back the switches)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
