"""Per-shape timing of the linear kernels `compress` can run, against bf16 `F.linear`: the evidence
behind the kernel choices in compress/formats (which rows take tinygemm, the fused GEMV, or
dequantize + cuBLAS). Decode-sized rows are timed compiled (as the engine's compiled decode step
runs them), prefill-sized rows eagerly (as its prefill runs them).

    python -m compress.evaluate.kernel_bench --shape llama3-8b --rows 1,8,2048 --out kernels.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn
from torch._inductor import config as inductor_config

from compress.evaluate.results import environment
from compress.evaluate.timing import calls_per_sample, l2_flush, seconds_per_call
from compress.errors import UserError
from compress.formats import grid, triton_kernels
from compress.formats.fp8 import FP8Linear, fp8_capable
from compress.formats.w8a8 import W8A8Linear
from compress.quant.rtn import quantized_linear
from compress.shapes import llama_config
from compress.sources import check_device

COMPILED_MAX_ROWS = 64  # rows up to this are decode batches: timed through torch.compile
# Compiled inductor reductions whose block sizes matter: also timed with coordinate-descent
# tuning (`compress bench --tune-kernels`), as "<name> tuned".
TUNED = ("int8", "int4 fused-gemv")
ONE_GRAPH = "inductor"  # W8A8 / FP8 layers' kernel choice (formats/base.py, RowScaledLinear)


def linear_shapes(shape: str, kinds: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each kind of decoder linear of a real model shape."""
    c = llama_config(shape)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shapes = {"q_proj": (c.num_attention_heads * head_dim, c.hidden_size),
              "k_proj": (c.num_key_value_heads * head_dim, c.hidden_size),
              "gate_proj": (c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size)}
    unknown = [k for k in kinds if k not in shapes]
    if unknown:
        raise UserError(f"--linears: unknown kind(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(shapes)}")
    return {k: shapes[k] for k in kinds}


def candidates(out_features: int, in_features: int, group_size: int, device) -> dict:
    """name -> a callable on bf16 activations: bf16 and every compressed format of one layer."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False, device=device)
    nn.init.normal_(linear.weight, std=0.02)  # random, never zeros
    int4 = quantized_linear(linear, 4, group_size, True).to(torch.bfloat16)
    int4.prepare_fast(torch.bfloat16)
    found = {"int4": int4,
             "int8": quantized_linear(linear, 8, 0, True).to(torch.bfloat16),
             "w8a8 int8": W8A8Linear.from_float(linear)}
    if int4._fast is not None:  # tinygemm at every size, to compare with what int4 chooses
        found["int4 tinygemm forced"] = int4._fast
    if torch.device(device).type == "cuda":  # one compiled row: inductor's GEMV, not tinygemm
        found["int4 fused-gemv"] = copy.deepcopy(int4)
        found["int4 fused-gemv"].set_kernel("fused-gemv")
    if triton_kernels.available(torch.device(device)) is None:  # GEMV, GEMM (int4: 2-64 rows
        for name in ("int4", "int8"):                           # stay on tinygemm)
            chosen = copy.deepcopy(found[name])
            chosen.set_kernel("triton")
            found[f"{name} triton"] = chosen
    if fp8_capable(device):
        found["fp8"] = FP8Linear.from_float(linear)
    if torch.device(device).type == "cuda":  # prefill rows as one graph: autotuned GEMM, fused
        for name in [k for k in ("w8a8 int8", "fp8") if k in found]:  # rescale (eager rows)
            found[f"{name} {ONE_GRAPH}"] = copy.deepcopy(found[name])
            found[f"{name} {ONE_GRAPH}"].set_kernel("inductor")
    return {"bf16 F.linear": linear.to(torch.bfloat16), **found}


def label(fn, compiled: bool) -> str:
    if isinstance(fn, nn.Linear):
        return "F.linear" if not compiled else "F.linear (compiled)"
    kernel = getattr(fn, "compiled_kernel", None) if compiled else None
    kernel = kernel or getattr(fn, "kernel", None) or "torch._weight_int4pack_mm"
    triton = getattr(fn, "_triton", None)
    return f"{kernel} [{triton.tuning}]" if triton is not None else kernel


def bench_shape(name: str, out_features: int, in_features: int, rows: list[int], group_size: int,
                device, repeats: int, flush=None) -> Iterator[dict]:
    """One record per row count, yielded as soon as it is measured. `flush` (timing.l2_flush)
    runs before every timed call."""
    found = candidates(out_features, in_features, group_size, device)
    for m in rows:
        x = torch.randn(m, in_features, device=device, dtype=torch.bfloat16)
        compiled = m <= COMPILED_MAX_ROWS and torch.device(device).type == "cuda"
        calls = calls_per_sample(m)
        row = {"linear": name, "out": out_features, "in": in_features, "rows": m,
               "compiled": compiled, "us": {}, "kernel": {}, "clock": {}}
        # The fused GEMV serves one row; at more it is the int4 column again. The one-graph
        # kernels serve eager rows; compiled rows are one graph with every kernel already.
        keys = [k for k in found if (m == 1 or not k.startswith("int4 fused-gemv"))
                and not (compiled and k.endswith(ONE_GRAPH))]
        timed = [(key, found[key], False) for key in keys]
        timed += [(f"{key} tuned", found[key], True) for key in TUNED if compiled and key in keys]
        for key, module, tune in timed:
            fn = module
            if compiled:
                torch.compiler.reset()  # one code object per layer class: keep under the limit
                fn = torch.compile(module, dynamic=False)
            try:
                with inductor_config.patch(coordinate_descent_tuning=tune):
                    fn(x)  # compile, and set the eager labels
                # Prefill rows run eagerly in the model: their host overhead counts, no graph.
                seconds, row["clock"][key] = seconds_per_call(lambda: fn(x), device, calls, 2,
                                                              repeats, graph=compiled,
                                                              flush=flush)
            except Exception as exc:  # a kernel this GPU or torch lacks: say so, go on
                row["kernel"][key] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:160]
                continue
            if compiled and not isinstance(module, nn.Linear) and hasattr(module, "kernel"):
                module(x)  # one eager call for the labels (a compiled call does not set them)
            row["us"][key] = seconds * 1e6
            row["kernel"][key] = label(module, compiled) + (" (tuned)" if tune else "")
        base = row["us"].get("bf16 F.linear")
        row["speedup"] = {k: base / v for k, v in row["us"].items()} if base else {}
        print(f"{name} {out_features}x{in_features} rows {m}: " + ", ".join(
            f"{k} {v:.1f} us" for k, v in row["us"].items()), flush=True)
        yield row


def markdown(doc: dict) -> str:
    env = doc["environment"]
    where = env.get("gpu") if str(doc["device"]).startswith("cuda") else \
        f"CPU ({env.get('cpu')}, {env.get('threads')} threads): not a GPU figure"
    lines = [f"# Linear kernels: {doc['shape']} shapes on {where}", "",
             f"Microseconds per call (median of {doc['repeats']}), speed-up over bf16 `F.linear` "
             f"in brackets. On CUDA, rows up to {COMPILED_MAX_ROWS} are timed through "
             "`torch.compile` (as the compiled decode step runs them), more rows eagerly (as the "
             "prefill runs them); on the CPU everything runs eagerly. On CUDA the L2 cache is "
             "flushed before every call (its time subtracted), as gigabytes of other weights "
             "pass between two uses of a layer in a model. "
             f"int4: symmetric, group {doc['group_size']}; int8: per channel. Clocks: "
             f"{', '.join(sorted({c for r in doc['records'] for c in r.get('clock', {}).values()}))}"
             ".", ""]
    keys = sorted({k for r in doc["records"] for k in r["us"]} | {"bf16 F.linear"},
                  key=lambda k: (k != "bf16 F.linear", k))
    lines += ["| linear | rows | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in doc["records"]:
        cells = [f"{r['us'][k]:.1f} ({r['speedup'].get(k, 0):.2f}x)" if k in r["us"] else
                 ("failed" if k in r["kernel"] else "-") for k in keys]
        lines.append(f"| {r['linear']} {r['out']}x{r['in']} | {r['rows']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| linear | rows | kernel of each column |", "|---|---|---|"]
    for r in doc["records"]:
        lines.append(f"| {r['linear']} | {r['rows']} | "
                     + "; ".join(f"{k}: {v}" for k, v in r["kernel"].items()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", help="random:<shape> name (llama3-8b)")
    p.add_argument("--linears", default="gate_proj,down_proj",
                   help="kinds: q_proj,k_proj,gate_proj,down_proj (default gate_proj,down_proj)")
    p.add_argument("--rows", default="1,8,2048", help="activation rows (tokens), default 1,8,2048")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (128)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True, help="JSON path; the Markdown goes beside it")
    args = p.parse_args(argv)
    try:  # before any timing, one line rather than a traceback
        try:
            rows = [int(r) for r in args.rows.split(",")]
        except ValueError:
            raise UserError(f"--rows takes comma-separated integers, got {args.rows!r}") from None
        if any(r < 1 for r in rows) or args.repeats < 1:
            raise UserError(f"--rows and --repeats must be >= 1, got {args.rows}, {args.repeats}")
        shapes = linear_shapes(args.shape, [k.strip() for k in args.linears.split(",")])
        check_device(args.device)
        if os.path.isdir(args.out):
            raise UserError(f"--out {args.out} is a folder; give a JSON file name, such as "
                            f"{os.path.join(args.out, 'kernels.json')}")
        for name, (_, in_f) in shapes.items():
            try:
                grid.check_group_size(name, in_f, args.group_size, bits=4)
            except UserError as exc:
                raise UserError(f"--group-size: {exc}") from None
    except UserError as exc:
        print(f"kernel_bench: error: {exc}", file=sys.stderr)
        return 2
    doc = {"shape": args.shape, "group_size": args.group_size, "repeats": args.repeats,
           "device": args.device, "environment": environment(args.device), "records": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with torch.inference_mode():
        flush = l2_flush(args.device)  # each call reads its weight from memory, as in a model
        for name, (out_f, in_f) in shapes.items():
            for record in bench_shape(name, out_f, in_f, rows, args.group_size, args.device,
                                      args.repeats, flush):
                doc["records"].append(record)
                write_files(doc, args.out)  # after every record: a run cut short keeps them
    print(markdown(doc))
    return 0


def write_files(doc: dict, path: str) -> None:
    """The JSON at `path` and the Markdown beside it, each replaced whole (never half-written)."""
    for target, text in ((path, json.dumps(doc, indent=1)),
                         (os.path.splitext(path)[0] + ".md", markdown(doc))):
        with open(target + ".tmp", "w") as f:
            f.write(text)
        os.replace(target + ".tmp", target)


if __name__ == "__main__":
    raise SystemExit(main())
