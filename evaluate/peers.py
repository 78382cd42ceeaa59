"""Peers measured in the same run as our engine, as rows of the same table.

- hf / hf-eager: Hugging Face `generate` with a static cache, what most users run, timed end to
  end (its own prefill, token loop and stopping logic). On CUDA `hf` lets transformers
  auto-compile the forward as it does by default for static caches; `hf-eager` disables that.
- bnb-int8 / bnb-nf4: bitsandbytes LLM.int8 and NF4 loaded through transformers'
  BitsAndBytesConfig, run by our engine (CUDA only).
- torchao-int4 / torchao-int8: torchao weight-only quantization (`quantize_`), run by our engine
  (CUDA only, and only where torchao imports). Int4 asks for tinygemm's packing: torchao's
  default since 0.14 runs fbgemm-gpu-genai kernels, a package the GPU image lacks. torchao also
  sets the inductor options it recommends (coordinate-descent tuning among them) for its rows,
  which `compress bench --tune-kernels` matches; they are undone after its rows.
A peer that cannot run becomes a row with `skipped` and the reason, never a silent gap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import os
import tempfile

import torch
from torch import nn

from compress.adapters import adapter_for
from compress.errors import first_line
from compress.evaluate.bench import (HF_PEERS, BenchConfig, bench_engine, linear_kernels,
                                     sync_and_free)
from compress.evaluate.engine import random_tokens
from compress.evaluate.memory import model_peak, other_resident_bytes, weight_bytes
from compress.evaluate.timing import PeakMemory, is_cuda, time_it


def run_peer(name: str, model, source: str, cfg: BenchConfig, device, ceil: dict) -> dict:
    """Measure one peer; any failure becomes a skipped row with a one-line reason."""
    try:
        reason = _unavailable(name, device, source)
        if reason:
            return skipped(name, reason)
        if name in HF_PEERS:
            return bench_hf_generate(model, cfg, device, ceil, compile_auto=name == "hf")
        with restored_global_settings():
            peer_model = _load_bnb(name, source) if name.startswith("bnb") else \
                _load_torchao(name, source, device)
            try:
                row = _bench_compiled_else_eager(peer_model, cfg, device, name, ceil)
            finally:
                del peer_model
                sync_and_free(device)
        row["runner"] += f"; weights by {name.split('-')[0]}"
        return row
    except Exception as exc:  # a peer's failure must not lose the rows already measured
        return skipped(name, f"failed: {_reason(exc)}")


def _bench_compiled_else_eager(model, cfg: BenchConfig, device, name: str, ceil: dict) -> dict:
    """Our engine on a peer library's model; where its layers cannot be compiled into one graph
    (bitsandbytes' LLM.int8 checks for outliers on the host in every forward), the row is
    measured eager and says why, rather than lost."""
    compiles = cfg.compile or cfg.compile_prefill
    try:
        return bench_engine(model, cfg, device, name, ceil)
    except Exception as exc:
        if not compiles:
            raise
        reason = _reason(exc)
    sync_and_free(device)
    eager = dataclasses.replace(cfg, compile=False, compile_prefill=False, tune_kernels=False)
    row = bench_engine(model, eager, device, name, ceil)
    row["runner"] += f" (eager: compiling failed, {reason})"
    return row


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {first_line(exc)[:200]}"


@contextlib.contextmanager
def restored_global_settings():
    """Undo, on the way out, what a peer library changes process-wide (torchao's `quantize_` sets
    inductor options and the float32 matmul precision), so that rows measured later do not
    inherit it."""
    from torch._inductor import config as inductor_config

    saved, precision = inductor_config.save_config(), torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        inductor_config.load_config(saved)
        torch.set_float32_matmul_precision(precision)


def torchao_int4_options(config_class) -> dict:
    """Keyword arguments that make torchao's Int4WeightOnlyConfig pack for tinygemm
    (`torch._weight_int4pack_mm`): explicit from 0.14 on (`int4_packing_format`), where the
    default became fbgemm-gpu-genai's format; 0.13 (`packing_format`) and older default to it."""
    parameters = inspect.signature(config_class).parameters
    return {"int4_packing_format": "tile_packed_to_4d"} if "int4_packing_format" in parameters \
        else {}


def skipped(name: str, reason: str) -> dict:
    return {"name": name, "skipped": reason}


def _unavailable(name: str, device, source: str) -> str | None:
    if name.startswith(("bnb", "torchao")) and not is_cuda(device):
        return "CUDA only"
    if name.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if name.startswith("torchao") and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    if name.startswith(("bnb", "torchao")) and os.path.exists(os.path.join(source, "compress.json")):
        return "needs a float model source, not a compress checkpoint"
    return None


def bench_hf_generate(model, cfg: BenchConfig, device, ceil: dict, compile_auto: bool) -> dict:
    """`model.generate` with a static cache: TTFT = generate(1 token); decode ms/token =
    (generate(new + 1) - generate(1)) / new, so its whole token loop is inside the figure."""
    from transformers import GenerationConfig

    compiled = compile_auto and is_cuda(device)
    weights = weight_bytes(model)
    resident = other_resident_bytes(weights["total"], device)
    row = {"name": "hf" if compile_auto else "hf-eager",
           "runner": "transformers generate (static cache"
                     + (", auto-compiled forward)" if compiled else ", eager)"),
           "compiled": compiled, "weight_bytes": weights,
           "other_resident_bytes": resident, "prefill": [], "decode": []}
    vocab = model.config.vocab_size

    def generate(ids, new):
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  cache_implementation="static", eos_token_id=None,
                                  pad_token_id=model.config.pad_token_id or 0,
                                  disable_compile=not compile_auto)
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids),
                                  generation_config=config)

    for batch, length in cfg.prefill:
        ids = random_tokens(batch, length, vocab, device, cfg.seed)
        static_cache_at_least(model, -1)
        with PeakMemory(device) as peak:
            timing = time_it(lambda: generate(ids, 1), device, cfg.warmup, cfg.repeats)
        seconds = timing["median_s"]
        row["prefill"].append({"batch": batch, "tokens": length, "ttft_ms": seconds * 1e3,
                               "tokens_per_s": batch * length / seconds,
                               "peak_allocated_bytes": peak.peak,
                               "model_peak_bytes": model_peak(peak.peak, resident),
                               "timing": timing})
        sync_and_free(device)
    for batch in cfg.batches:
        ids = random_tokens(batch, cfg.prompt, vocab, device, cfg.seed + batch)
        # Both runs on the cache the longer one needs, so their difference is the decode steps.
        static_cache_at_least(model, cfg.prompt + cfg.new)
        with PeakMemory(device) as peak:
            first = time_it(lambda: generate(ids, 1), device, cfg.warmup, cfg.repeats)
            full = time_it(lambda: generate(ids, cfg.new + 1), device, cfg.warmup, cfg.repeats)
        seconds = full["median_s"] - first["median_s"]
        decode = {"batch": batch, "prompt": cfg.prompt, "new_tokens": cfg.new,
                  "ms_per_token": seconds / cfg.new * 1e3 if seconds > 0 else None,
                  "tokens_per_s": batch * cfg.new / seconds if seconds > 0 else None,
                  "end_to_end_s": full["median_s"], "peak_allocated_bytes": peak.peak,
                  "model_peak_bytes": model_peak(peak.peak, resident),
                  "timing": {"generate_1": first, "generate_new_plus_1": full}}
        if seconds <= 0:  # timing noise larger than the decode steps: no figure, not a tiny one
            decode["note"] = (f"generate({cfg.new + 1}) took no longer than generate(1): "
                              "no decode time to report; time more new tokens")
        row["decode"].append(decode)
        sync_and_free(device)
    row["kernels"] = linear_kernels(model)
    return row


def static_cache_at_least(model, length: int) -> None:
    """transformers' `generate` allocates a static cache of at least the longest it allocated
    before on this model (`_previous_max_cache_length`, to spare recompiles): after a 1x2048
    prefill row every later row would attend over 2048 slots, where our engine allocates what
    each row needs. Set that floor per row (-1: none)."""
    model._previous_max_cache_length = length


def _load_bnb(name: str, source: str):
    """Load `source` through transformers with a BitsAndBytesConfig. Random shapes are written to
    a temporary folder first, since quantization happens in `from_pretrained`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if name == "bnb-int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    kwargs = dict(quantization_config=quant, dtype=torch.bfloat16, device_map="cuda")
    if source.startswith("random:"):
        from compress.sources import load_random

        with tempfile.TemporaryDirectory(prefix="compress-bench-") as folder:
            float_model = load_random(source.split(":", 1)[1], torch.bfloat16,
                                      device="cuda").model
            float_model.save_pretrained(folder)
            del float_model
            sync_and_free("cuda")
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    if source == "smollm2-135m" or source.endswith(".gguf"):
        from compress.sources import SMOLLM2_FILE, smollm2_path

        path = smollm2_path() if source == "smollm2-135m" else source
        folder, file = os.path.split(os.path.abspath(path))
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=file or SMOLLM2_FILE,
                                                    **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()


def _load_torchao(name: str, source: str, device):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    from compress.sources import load_model

    model = load_model(source, dtype=torch.bfloat16, device=str(device)).model
    widths = (model.config.hidden_size, model.config.intermediate_size)
    group = 128 if all(w % 128 == 0 for w in widths) else 64  # smollm2's 576 needs 64
    config = Int4WeightOnlyConfig(group_size=group, **torchao_int4_options(Int4WeightOnlyConfig)) \
        if name == "torchao-int4" else Int8WeightOnlyConfig()
    # The decoder's linears, as our int4 / int8 recipes quantize: quantize_'s default would take
    # the lm_head too, and the rows would differ in what they read, not only in kernels.
    layers = adapter_for(model).layers_path + "."
    quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear)
              and fqn.startswith(layers))
    return model
