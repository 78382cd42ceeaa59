"""`compress bench MODEL_OR_DIR [--batch 1,8,32] [--prompt 512] [--new 128] [--prefill 1x2048,8x512]
[--compile] [--device cuda] [--peers hf,bnb-int8,...] [--out DIR]`: speed and memory, printed and
written as bench.json + bench.md."""
from __future__ import annotations

import os

from compress.checkpoint import atomic_output_dir
from compress.commands import add_model_options, resolve_dtype
from compress.commands.report import write_text
from compress.errors import UserError, choices
from compress.evaluate.bench import PEERS, BenchConfig
from compress.evaluate.results import write_json
from compress.recipe import BenchSettings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure prefill / decode speed and memory",
                              description="Prefill tokens/s and time to first token, decode "
                              "ms/token (token loop included), memory, roofline and kernels, "
                              "with peers in the same run (PROTOCOL.md 'Speed').")
    p.add_argument("model", help="smollm2-135m, random:<shape>, a checkpoint folder, a .gguf "
                                 "file or a hub id")
    p.add_argument("--batch", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    p.add_argument("--prompt", type=int, default=512, help="decode prompt tokens (default 512)")
    p.add_argument("--new", type=int, default=128, help="timed decode tokens (default 128)")
    p.add_argument("--prefill", default="1x2048,8x512",
                   help="prefill shapes BATCHxTOKENS (default 1x2048,8x512)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (CUDA graphs on CUDA); compile time reported apart")
    add_runtime_switches(p)
    p.add_argument("--kernel", default="", metavar="FORMAT=KERNEL[,...]",
                   help="kernel per layer format instead of the measured default, e.g. "
                        "int4=triton,int8=triton (compress/formats/triton_kernels.py: a GEMV for one "
                        "row, a dequantizing GEMM for many), int4=fused-gemv (inductor's fused "
                        "dequantize-GEMV for one compiled row) or w8a8-int8=inductor / "
                        "fp8-e4m3=inductor (prefill rows as one inductor graph: GEMM timed "
                        "against Triton's, rescale fused); other formats keep theirs")
    p.add_argument("--peers", default="hf",
                   help=f"comma list of peers or 'none' (default hf); allowed: {', '.join(PEERS)}")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs, median reported (default 5)")
    p.add_argument("--out", default=None, help="folder for bench.json and bench.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_model_options(p)
    p.set_defaults(run=run)


# On / off switches of a timed run, as BenchSettings and BenchConfig fields: `compress bench`
# spells them --NAME, `compress sweep` --bench-NAME, a recipe's bench section NAME.
RUNTIME_SWITCHES = {
    "compile_prefill": "also compile the prefill forward (one graph per prompt shape): inductor "
                       "fuses the element-wise work between the matmuls",
    "tune_kernels": "with --compile: tune the compiled step's Triton kernels (inductor's "
                    "coordinate descent, as gpt-fast does); longer compile",
    "semi_structured": "on CUDA, run a 2:4-pruned model's linears as semi-structured sparse "
                       "tensors (cuSPARSELt/CUTLASS) at the row counts where each shape measured "
                       "faster than dense; dense models are unchanged",
    "fuse_projections": "run q/k/v and gate/up as one matmul each, as inference engines do "
                        "(fewer, larger kernels per decode step)",
    "gqa_decode": "decode attention reads the grouped K/V cache as stored, without "
                  "transformers' repeat_kv copy of it (evaluate/attention.py)",
    "profile": "after timing, profile a few decode steps and one prefill: the top kernels by "
               "self time go to the JSON and the Markdown",
}


def add_runtime_switches(parser, prefix: str = "") -> None:
    for field, flag in switch_flags(prefix).items():
        parser.add_argument(flag, action="store_true", help=RUNTIME_SWITCHES[field])


def runtime_switches(args, prefix: str = "") -> dict:
    """The switches' values from parsed flags (`prefix` as given to add_runtime_switches)."""
    dest = prefix.replace("-", "_")
    return {field: getattr(args, dest + field) for field in RUNTIME_SWITCHES}


def switch_flags(prefix: str = "") -> dict:
    """Field -> the flag as the user writes it, for error messages."""
    return {field: f"--{prefix}{field.replace('_', '-')}" for field in RUNTIME_SWITCHES}


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in text.split(","):
        batch, sep, tokens = item.strip().lower().partition("x")
        if not sep or not batch.isdigit() or not tokens.isdigit():
            raise UserError(f"prefill shapes are BATCHxTOKENS, comma-separated, e.g. 1x2048,8x512;"
                            f" got {item!r}")
        shapes.append((int(batch), int(tokens)))
    return tuple(shapes)


def parse_kernel_choices(text: str, what: str = "--kernel") -> tuple[tuple[str, str], ...]:
    """'int4=triton,int8=triton' -> (("int4", "triton"), ("int8", "triton"))."""
    pairs = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        fmt, sep, kernel = item.partition("=")
        if not sep or not fmt.strip() or not kernel.strip():
            raise UserError(f"{what} takes FORMAT=KERNEL pairs, e.g. int4=triton; got {item!r}")
        fmt, kernel = fmt.strip(), kernel.strip()
        check_kernel_choice(fmt, kernel, what)
        pairs.append((fmt, kernel))
    return tuple(pairs)


def check_kernel_choice(fmt: str, kernel: str, what: str) -> None:
    """A format and kernel that exist, whether or not the model has layers of that format (a
    typo would otherwise pass silently on a model without them)."""
    from compress.formats import FORMATS

    if fmt not in FORMATS:
        raise UserError(f"{what}: unknown format {fmt!r}; allowed: {choices(FORMATS)}")
    allowed = FORMATS[fmt].kernel_choices
    if kernel not in allowed:
        raise UserError(f"{what}: {fmt} layers have no kernel {kernel!r}; allowed: "
                        f"{choices(allowed)}")


def build_bench_config(settings, flag, **extra) -> BenchConfig:
    """The BenchConfig of string-valued speed settings: a recipe's `bench` section, or the flags
    of `compress bench` / `compress sweep --bench-*` gathered into a BenchSettings. `flag(field)`
    names a field in error messages as the user wrote it; `extra` are BenchConfig fields."""
    if settings.tune_kernels and not settings.compile:
        raise UserError(f"{flag('tune_kernels')} tunes the compiled decode step's kernels: it "
                        f"needs {flag('compile')}")
    return BenchConfig(batches=parse_ints(settings.batches, flag("batches")),
                       prompt=settings.prompt, new=settings.new,
                       prefill=parse_shapes(settings.prefill), compile=settings.compile,
                       warmup=settings.warmup, repeats=settings.repeats,
                       **{field: getattr(settings, field) for field in RUNTIME_SWITCHES},
                       kernel_choices=parse_kernel_choices(settings.kernel, flag("kernel")),
                       **extra)


def parse_peers(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(p.strip() for p in text.split(",") if p.strip())


def run(args) -> int:
    from compress.evaluate.bench_run import markdown, print_table, run_bench

    dtype = resolve_dtype(args)
    settings = BenchSettings(batches=args.batch, prompt=args.prompt, new=args.new,
                             prefill=args.prefill, warmup=args.warmup, repeats=args.repeats,
                             compile=args.compile, kernel=args.kernel, **runtime_switches(args))
    flags = {"batches": "--batch", "kernel": "--kernel", "compile": "--compile", **switch_flags()}
    cfg = build_bench_config(settings, flags.get,
                             peers=parse_peers(args.peers))
    def progress(message):
        print(message, flush=True)

    if not args.out:
        print_table(run_bench(args.model, cfg, args.device, dtype, progress=progress))
        return 0

    with atomic_output_dir(args.out, args.overwrite) as tmp:
        def write(doc):
            write_json(doc, os.path.join(tmp, "bench.json"))
            write_text(os.path.join(tmp, "bench.md"), markdown(doc))

        # Each row lands in the hidden temporary folder as it is measured: a run killed by a
        # time limit leaves them there (marked incomplete); only a finished run replaces OUT.
        doc = run_bench(args.model, cfg, args.device, dtype, progress=progress, on_row=write)
        write(doc)
    print_table(doc)
    print(f"wrote {args.out}/bench.json and bench.md")
    return 0
