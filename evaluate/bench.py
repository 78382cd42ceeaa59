"""Speed and memory of one model with our engine (PROTOCOL.md "Speed"): prefill, decode with the
token loop included, memory by component and per phase, the kernel behind each kind of linear,
and the decode roofline against the copy bandwidth measured in the same run."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compress.adapters import adapter_for, decoder_linears
from compress.errors import UserError
from compress.evaluate.attention import use_gqa_decode_attention
from compress.evaluate.engine import Engine, random_tokens
from compress.evaluate.fuse import fuse_projections
from compress.evaluate.memory import (model_peak, other_resident_bytes, parameter_count,
                                      stored_tensors, weight_bytes)
from compress.evaluate.profile import prepare_for_cuda_graphs, profile_phases
from compress.evaluate.timing import (PeakMemory, calls_per_sample, ceilings, is_cuda,
                                      l2_flush, seconds_per_call, synchronize, time_it)
from compress.formats.base import drop_kernel_layouts
from compress.prune.semi_structured import is_2of4_model, materialize_2of4_where_faster

# The hf peers time our model object as loaded; the others load quantized copies of their own.
HF_PEERS = ("hf", "hf-eager")
PEERS = (*HF_PEERS, "bnb-int8", "bnb-nf4", "torchao-int4", "torchao-int8")


@dataclass
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32)
    prompt: int = 512
    new: int = 128
    prefill: tuple[tuple[int, int], ...] = ((1, 2048), (8, 512))
    compile: bool = False
    # Also compile the prefill forward (one graph per prompt shape, no CUDA graphs).
    compile_prefill: bool = False
    # Inductor's coordinate-descent tuning of the compiled decode step's Triton kernels (the
    # fused dequantize-GEMV is a reduction whose block sizes matter), as gpt-fast compiles; it
    # adds compile time. Needs `compile`.
    tune_kernels: bool = False
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    peers: tuple[str, ...] = ()
    # On CUDA, give a 2:4-pruned model torch's semi-structured sparse weights (cuSPARSELt /
    # CUTLASS) where they were measured faster than dense, per shape and row count, before
    # timing; dense models are left as they are.
    semi_structured: bool = False
    # Run q/k/v and gate/up as one matmul each (evaluate/fuse.py), as inference engines do.
    fuse_projections: bool = False
    # Decode attention on the grouped K/V cache as stored, without repeat_kv's copy of it.
    gqa_decode: bool = False
    # After the timed rows, profile a few decode steps and one prefill (evaluate/profile.py).
    profile: bool = False
    # (format, kernel) pairs: run the layers of that format with another kernel than the measured
    # default, e.g. (("int4", "triton"),); QuantizedLinear.set_kernel checks and applies them.
    kernel_choices: tuple[tuple[str, str], ...] = ()
    copy_bytes: int | None = None   # default: 2 GiB on CUDA, 64 MiB on CPU
    matmul_n: int | None = None     # default: 8192 on CUDA, 1024 on CPU
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        sizes = [*self.batches, self.prompt, self.new, *(x for p in self.prefill for x in p)]
        if not self.batches or any(int(v) < 1 for v in sizes):
            raise UserError(f"batch sizes, prompt, new tokens and prefill shapes must be >= 1, "
                            f"got batches {self.batches}, prompt {self.prompt}, new {self.new}, "
                            f"prefill {self.prefill}")
        if self.repeats < 1 or self.warmup < 0:
            raise UserError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, "
                            f"{self.warmup}")
        unknown = set(self.peers) - set(PEERS)
        if unknown:
            raise UserError(f"unknown peer {sorted(unknown)[0]!r}; allowed: {', '.join(PEERS)}")

    def prefill_rows(self) -> set[int]:
        """Rows (batch x tokens) of each prefill shape: what its linears multiply."""
        return {batch * length for batch, length in self.prefill}

    def protocol(self, device) -> dict:
        return {"batches": list(self.batches), "prompt": self.prompt, "new_tokens": self.new,
                "prefill": [list(p) for p in self.prefill], "warmup": self.warmup,
                "repeats": self.repeats, "statistic": "median", "decode": "greedy, no early stop, "
                "token loop included, first token from the prefill not counted",
                "inputs": "random token ids in [1, vocab)", "compile": self.compile,
                "tune_kernels": self.tune_kernels, "compile_prefill": self.compile_prefill,
                "semi_structured": self.semi_structured,
                "fuse_projections": self.fuse_projections, "gqa_decode": self.gqa_decode,
                "profile": self.profile,
                "kernel_choices": dict(self.kernel_choices), "device": str(device)}


def measure_ceilings(cfg: BenchConfig, device, dtype: torch.dtype) -> dict:
    cuda = is_cuda(device)
    copy_bytes = cfg.copy_bytes or (2 << 30 if cuda else 64 << 20)
    n = cfg.matmul_n or (8192 if cuda else 1024)
    return ceilings(device, copy_bytes, n, torch.bfloat16 if cuda else dtype)


def bench_engine(model: nn.Module, cfg: BenchConfig, device, name: str, ceil: dict) -> dict:
    """One row: our engine on `model` (already on `device`, eval mode). Fused projections and
    the decode attention are undone afterwards; a 2:4 model keeps its semi-structured weights.
    Peaks are also given as the model's own (`model_peak_bytes`): less what was resident before
    the row and is not this model's weights, such as a sweep's source model."""
    for module in model.modules():  # built by earlier forwards (a sweep's perplexity): the
        drop_kernel_layouts(module)  # engine rebuilds them, inside this row's own memory
    # What earlier rows left: their engines, KV caches included, stay alive through their
    # compiled steps until dynamo is reset (compile_decode does, mid-row) or through reference
    # cycles. On an H100 the first recipe's row counted the baseline's 256 MiB cache as another
    # model's, which was then freed before its decode: that peak came out at least 0.24 GB low
    # (reports/h100-llama3-8b). Released here, before anything is measured.
    torch.compiler.reset()
    gc.collect()
    resident = other_resident_bytes(weight_bytes(model)["total"], device)
    if cfg.profile:
        prepare_for_cuda_graphs(device)
    semi = None
    if cfg.semi_structured and is_cuda(device) and is_2of4_model(model):
        semi = materialize_2of4_where_faster(model, sorted({*cfg.batches, *cfg.prefill_rows()}),
                                             linear_timer(device, replayed_rows(cfg)))
    fused = fuse_projections(model) if cfg.fuse_projections else None
    attention = use_gqa_decode_attention(model) if cfg.gqa_decode else None
    try:
        row = _bench_engine(model, cfg, device, name, ceil, resident)
    finally:
        for transform in (attention, fused):
            if transform is not None:
                transform.undo()
    row["semi_structured_linears"] = sum(c != "dense" for c in semi["linears"].values()) \
        if semi else 0
    row["semi_structured_shapes"] = semi["shapes"] if semi else None
    row["fused_projection_groups"] = len(fused.groups) if fused else 0
    row["gqa_decode_attention"] = attention is not None
    return row


def _bench_engine(model: nn.Module, cfg: BenchConfig, device, name: str, ceil: dict,
                  resident: int | None) -> dict:
    chosen = choose_kernels(model, cfg.kernel_choices)
    engine = Engine(model)
    vocab = model.config.vocab_size
    weights = weight_bytes(model)
    row = {"name": name, "runner": "compress engine (static cache, own token loop)",
           "compiled": cfg.compile, "parameters": parameter_count(model),
           "weight_bytes": weights, "kernel_choice_layers": chosen,
           "other_resident_bytes": resident,
           "prefill": [], "decode": []}
    matmul = ceil["matmul"]["flop_per_s"]
    for batch, length in cfg.prefill:
        engine.allocate(batch, length)
        ids = random_tokens(batch, length, vocab, device, cfg.seed)
        compile_s = _compile_prefill(engine, ids, device) if cfg.compile_prefill else None
        # Labels from an eager prefill of these rows: _compile_prefill's, else the timed ones.
        kernels = linear_kernels(model) if cfg.compile_prefill else None
        with PeakMemory(device) as peak:
            # Time to first token: the prefill forward and the choice of the first token.
            timing = time_it(lambda: engine.prefill(ids).argmax(-1), device, cfg.warmup,
                             cfg.repeats)
        seconds = timing["median_s"]
        flops = prefill_flops(model, batch, length)
        row["prefill"].append({
            "batch": batch, "tokens": length, "ttft_ms": seconds * 1e3,
            "tokens_per_s": batch * length / seconds, "flop_per_s": flops / seconds,
            "pct_of_matmul": 100 * flops / seconds / matmul,
            "kv_cache_bytes": engine.kv_cache_bytes(), "peak_allocated_bytes": peak.peak,
            "model_peak_bytes": model_peak(peak.peak, resident),
            "compile_s": compile_s, "kernels": kernels or linear_kernels(model),
            "timing": timing})
    engine.compile_prefill(False)  # the decode rows' prompts are not timed: no more compiles
    engine.allocate(1, 2)  # drop the prefill caches before the decode ones
    for batch in cfg.batches:
        row["decode"].append(_bench_decode(engine, cfg, batch, vocab, device, weights, ceil,
                                           resident))
    # The headline kernels: the first decode batch's (prefill rows carry their own).
    row["kernels"] = row["decode"][0]["kernels"] if row["decode"] else linear_kernels(model)
    if cfg.profile:
        try:
            row["profile"] = profile_phases(engine, cfg.prompt, min(cfg.new, 8), cfg.prefill[0],
                                            device, cfg.seed, compiled_prefill=cfg.compile_prefill)
        except Exception as exc:  # a diagnostic must not cost the figures measured above
            row["profile"] = {"failed": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    return row


def _compile_prefill(engine: Engine, ids: torch.Tensor, device) -> float:
    """One eager prefill of `ids` (it sets the layers' kernel labels), then the compiled one:
    returns the seconds its compilation and first run took, reported apart from the timing."""
    engine.compile_prefill(False)
    engine.prefill(ids)
    engine.compile_prefill()
    started = time.perf_counter()
    engine.prefill(ids)
    synchronize(device)
    return time.perf_counter() - started


def choose_kernels(model: nn.Module, choices: tuple[tuple[str, str], ...]) -> int:
    """Set each (format, kernel) choice on every quantized layer of that format; layers of other
    formats (a sweep's baseline, say) keep theirs. Returns how many layers were set."""
    from compress.formats.base import QuantizedLinear

    chosen = dict(choices)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.format in chosen]
    for layer in layers:
        layer.set_kernel(chosen[layer.format])
    return len(layers)


def _bench_decode(engine: Engine, cfg: BenchConfig, batch: int, vocab: int, device,
                  weights: dict, ceil: dict, resident: int | None) -> dict:
    # The timed loop runs `new` forward steps after the token chosen from the prefill logits:
    # positions prompt .. prompt + new - 1.
    engine.allocate(batch, cfg.prompt + cfg.new)
    compile_s = engine.compile_decode(tune=cfg.tune_kernels) if cfg.compile else None
    kernels = linear_kernels(engine.model, compiled=True) if cfg.compile else None
    ids = random_tokens(batch, cfg.prompt, vocab, device, cfg.seed + batch)
    state = {}

    peak = PeakMemory(device)

    def setup():  # the prefill is not part of the decode figure, in time or in memory
        state["logits"] = engine.prefill(ids)
        state["positions"] = engine.next_positions(cfg.prompt)
        peak.restart()

    def loop():
        engine.decode(state["logits"], state["positions"], cfg.new + 1, stop_on_eos=False)

    with peak:
        timing = time_it(loop, device, cfg.warmup, cfg.repeats, setup=setup)
    if kernels is None:  # uncompiled, the loop's last forward was a decode step: read its labels
        kernels = linear_kernels(engine.model)
    seconds = timing["median_s"]
    step_bytes = decode_bytes_per_step(weights, engine, cfg.prompt + (cfg.new + 1) / 2) \
        - unread_bytes(engine.model, batch)
    bandwidth = ceil["copy"]["bytes_per_s"]
    ms_per_token = seconds / cfg.new * 1e3
    roofline_ms = step_bytes / bandwidth * 1e3
    return {"batch": batch, "prompt": cfg.prompt, "new_tokens": cfg.new,
            "ms_per_token": ms_per_token, "tokens_per_s": batch * cfg.new / seconds,
            "bytes_per_step": step_bytes, "achieved_bytes_per_s": step_bytes / (seconds / cfg.new),
            "roofline_ms_per_token": roofline_ms, "pct_of_roofline": 100 * roofline_ms / ms_per_token,
            "kv_cache_bytes": engine.kv_cache_bytes(), "peak_allocated_bytes": peak.peak,
            "model_peak_bytes": model_peak(peak.peak, resident),
            "compile_s": compile_s, "kernels": kernels, "timing": timing}


def decode_bytes_per_step(weights: dict, engine: Engine, mean_context: float) -> float:
    """Bytes a decode step must read: every weight except the embedding table (only a few rows are
    gathered), unless the lm_head is tied to it; plus the K and V of the mean context length
    (the least an attention kernel reads; a static-cache SDPA may read the whole cache)."""
    tied = weights["lm_head"] == 0
    weight_read = weights["total"] - (0 if tied else weights["embedding"])
    # A sliding-window layer's cache holds its window: a step reads min(context, window) of it.
    kv_read = sum((layer.keys.nbytes + layer.values.nbytes)
                  * min(mean_context, layer.max_cache_len) / layer.max_cache_len
                  for layer in engine.cache.layers)
    return weight_read + kv_read


def unread_bytes(model: nn.Module, rows: int) -> int:
    """Stored bytes that a forward of `rows` rows leaves alone: the other form of each linear
    that keeps a dense and a 2:4 semi-structured weight (SemiStructuredLinear)."""
    return sum(size for m in model.modules() if hasattr(m, "unread_weight")
               for _, size in stored_tensors(m.unread_weight(rows)))


def replayed_rows(cfg: BenchConfig) -> set[int]:
    """Row counts that the timed phases run inside CUDA graphs: the compiled decode step's
    batches. A prefill runs eagerly (compiled or not), so a kernel's host overhead counts there:
    on an H100 the 2:4 products of a 2048-token prefill were faster on the GPU when replayed,
    yet the model's prefill took 91 ms against bf16's 64, of which 59 ms was GPU time
    (reports/h100-llama3-8b)."""
    return set(cfg.batches) - cfg.prefill_rows() if cfg.compile else set()


def linear_timer(device, replayed: set[int] = frozenset()):
    """timer(weight, rows) -> (seconds per F.linear of `rows` random rows, clock): replayed in a
    CUDA graph for the row counts in `replayed`, back-to-back calls with their host overhead
    otherwise, as each runs in the model. How materialize_2of4_where_faster compares dense and
    2:4."""
    flush = l2_flush(device)  # each call reads its weight from memory, as in the model

    @torch.inference_mode()  # as the engine runs them: no autograd graph for the dense weight
    def timer(weight: torch.Tensor, rows: int) -> tuple[float, str]:
        x = torch.randn(rows, weight.shape[1], device=device, dtype=weight.dtype)
        return seconds_per_call(lambda: F.linear(x, weight), device, calls_per_sample(rows), 2, 5,
                                graph=rows in replayed, flush=flush)
    return timer


def prefill_flops(model: nn.Module, batch: int, length: int) -> float:
    """2 x linear parameters x tokens, plus causal attention (QK^T and PV over the query-key pairs
    each layer attends: half the square, or the band of a sliding window); the lm_head runs on
    the last position only."""
    config = model.config
    linear = sum(m.in_features * m.out_features for _, m in decoder_linears(model))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pairs = sum(attended_pairs(length, window) for window in attention_windows(config))
    attention = 2 * 2 * batch * pairs * config.num_attention_heads * head_dim
    lm_head = 2 * batch * config.hidden_size * config.vocab_size
    return 2 * linear * batch * length + attention + lm_head


def attention_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full causal attention), as transformers reads them:
    `layer_types` where the config has it (Qwen2 with use_sliding_window), else `sliding_window`
    for every layer (Mistral). Not through transformers' own get_layer_types_and_kwargs: it
    returns one kwargs dict in 5.17 (the GPU image) and one per layer in 5.24."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * config.num_hidden_layers


def attended_pairs(length: int, window: int | None) -> float:
    """Query-key pairs of causal attention over `length` tokens, counted as half the square (as
    the attention FLOPs conventionally are); with a window, each query past it sees `window`."""
    if window is None or length <= window:
        return length * length / 2
    return window * window / 2 + (length - window) * window


def linear_kernels(model: nn.Module, compiled: bool = False) -> dict:
    """Kind of linear (q_proj, ..., lm_head) -> 'Class: kernel' as the last eager forward ran it,
    or (compiled) as a compiled forward of the same shapes runs it."""
    adapter = adapter_for(model)
    found: dict[str, dict[str, int]] = {}
    # "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"
    named = [(name[len(adapter.layers_path) + 1:].split(".", 1)[1], m)
             for name, m in decoder_linears(model)]
    named.append(("lm_head", adapter.lm_head(model)))
    for kind, module in named:
        label = f"{type(module).__name__}: {kernel_of(module, compiled)}"
        found.setdefault(kind, {}).setdefault(label, 0)
        found[kind][label] += 1
    return {kind: " + ".join(f"{label} (x{n})" if len(labels) > 1 else label
                             for label, n in labels.items())
            for kind, labels in found.items()}


def kernel_of(module: nn.Module, compiled: bool = False) -> str:
    kernel = getattr(module, "compiled_kernel", None) if compiled else None
    kernel = kernel or getattr(module, "kernel", None)
    if isinstance(kernel, str):
        return kernel
    weight = getattr(module, "weight", None)
    if type(module).__module__.startswith("bitsandbytes"):
        return f"bitsandbytes {type(module).__name__}"
    if weight is not None and type(weight) not in (torch.Tensor, nn.Parameter):
        return f"{type(weight).__name__} (tensor subclass)"  # torchao and similar
    return "torch.nn.functional.linear"


def sync_and_free(device) -> None:
    synchronize(device)
    if is_cuda(device):
        torch.cuda.empty_cache()
