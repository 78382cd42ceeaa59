"""Where a decode step and a prefill spend their time: torch.profiler's table of operations and
kernels for one run of each (`compress bench --profile`). It explains the timed figures (which
kernels dominate, how many launches a step makes); it does not replace them, since profiling
adds its own overhead."""
from __future__ import annotations

import time

import torch

from compress.evaluate.engine import Engine, random_tokens
from compress.evaluate.timing import is_cuda, synchronize

TOP = 20  # rows kept per phase


def prepare_for_cuda_graphs(device) -> None:
    """Run the profiler once, empty, before the first CUDA graph of the process is recorded:
    graphs recorded before the profiler's first use can be missing from its trace (pytorch
    #75504, worked around by torch's own tests with this helper), and the compiled decode step
    is such a graph."""
    if is_cuda(device):
        from torch.profiler import _utils

        init = getattr(_utils, "_init_for_cuda_graphs", None)
        if init is not None:
            init()


def profile_phases(engine: Engine, prompt: int, decode_steps: int,
                   prefill: tuple[int, int], device, seed: int = 0,
                   compiled_prefill: bool = False) -> dict:
    """Profile `decode_steps` decode steps at the engine's current allocation (the last decode
    batch measured, compiled if it was), then one prefill of `prefill` (batch, tokens), compiled
    when the timed prefill was (`compiled_prefill`): the profile explains the figure it sits by."""
    vocab = engine.config.vocab_size
    ids = random_tokens(engine.batch, prompt, vocab, device, seed)
    logits = engine.prefill(ids)
    positions = engine.next_positions(prompt)
    engine.decode(logits, positions.clone(), 2, stop_on_eos=False)  # warm: nothing to compile
    logits = engine.prefill(ids)
    synchronize(device)
    decode = _profiled(lambda: engine.decode(logits, positions, decode_steps + 1,
                                             stop_on_eos=False), device)
    decode.update(batch=engine.batch, steps=decode_steps)
    batch, length = prefill
    engine.allocate(batch, length)
    prompt_ids = random_tokens(batch, length, vocab, device, seed)
    engine.compile_prefill(compiled_prefill)
    try:
        engine.prefill(prompt_ids)  # warm (and compile, outside the profiled run)
        synchronize(device)
        prefill_profile = _profiled(lambda: engine.prefill(prompt_ids), device)
    finally:
        engine.compile_prefill(False)
    prefill_profile.update(batch=batch, tokens=length, compiled=compiled_prefill)
    return {"decode": decode, "prefill": prefill_profile}


def _profiled(fn, device) -> dict:
    """The top operations of one run of `fn`, its wall time under the profiler and, on a GPU,
    also the host's side (`host`): the CPU self time of the operators and runtime calls that
    launched the kernels. Where wall time exceeds GPU time the GPU waited, and the host table
    says on what (the H100's W8A8 prefill left it idle 43.5 of 112.3 ms, and only GPU kernels
    were recorded then)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = is_cuda(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        started = time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    result = top_operations(events, cuda)
    result["wall_ms"] = wall * 1e3
    if cuda:
        result["host"] = top_operations(events, cuda=False)
    return result


def top_operations(events, cuda: bool) -> dict:
    """The operations with the most self time (the GPU's kernels when `cuda`, else the CPU's
    operators and runtime calls), their calls and share of the total."""
    def self_us(event) -> float:
        if not cuda:
            return event.self_cpu_time_total
        # torch >= 2.4 names it device time; older releases, CUDA time.
        return getattr(event, "self_device_time_total", None) or \
            getattr(event, "self_cuda_time_total", 0.0)

    # On the GPU clock, kernels only: an operator's self device time repeats its kernels' time.
    # On the CPU clock, no kernels (a GPU profile's host side).
    events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") == cuda]
    rows = [(self_us(e), e.key, e.count) for e in events]
    total = sum(us for us, _, _ in rows) or 1.0
    rows.sort(key=lambda r: r[0], reverse=True)
    return {"clock": "GPU self time" if cuda else "CPU self time", "total_ms": total / 1e3,
            "calls": sum(count for us, _, count in rows if us > 0),
            "top": [{"op": name, "calls": count, "self_ms": us / 1e3,
                     "share_pct": 100 * us / total} for us, name, count in rows[:TOP] if us > 0]}


def markdown(profiles: dict) -> list[str]:
    """Markdown lines: one table per phase, the top operations by self time."""
    if "failed" in profiles:
        return ["", f"Profiling failed: {profiles['failed']}"]
    lines = []
    for phase, p in profiles.items():
        where = (f"batch {p['batch']}, {p['steps']} steps" if phase == "decode"
                 else f"{p['batch']} x {p['tokens']} tokens"
                 + (", compiled" if p.get("compiled") else ""))
        wall = f", {p['wall_ms']:.2f} ms wall" if "wall_ms" in p else ""
        lines += ["", f"**{phase}** ({where}{wall}): {p['clock']} {p['total_ms']:.2f} ms in "
                      f"{p['calls']} calls with time"] + _table(p["top"])
        if "host" in p:
            host = p["host"]
            lines += ["", f"Host side: {host['clock']} {host['total_ms']:.2f} ms in "
                          f"{host['calls']} calls"] + _table(host["top"])
    return lines


def _table(rows: list[dict]) -> list[str]:
    return ["", "| operation | calls | self ms | share % |", "|---|---|---|---|"] + [
        f"| `{r['op'][:90]}` | {r['calls']} | {r['self_ms']:.3f} | {r['share_pct']:.1f} |"
        for r in rows[:10]]
