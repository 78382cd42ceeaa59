"""Timing per PROTOCOL.md: warm-up first, CUDA events on CUDA (perf_counter after synchronize on
CPU), the median of repeats; and the device ceilings (copy bandwidth, matmul rate) measured in
the same run, so that a roofline percentage never mixes two machines' figures."""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def on_device(device):
    """`device` as the current CUDA device: events, streams and graphs go to the current device,
    so timing `cuda:1` work with cuda:0's events would measure only the launches."""
    return torch.cuda.device(torch.device(device)) if is_cuda(device) else nullcontext()


def time_it(fn: Callable[[], object], device, warmup: int = 2, repeats: int = 5,
            setup: Callable[[], object] | None = None) -> dict:
    """Seconds per call of `fn`: median, min, max and every sample.

    `setup` runs before each call, outside the timed region (e.g. resetting a cache, a prefill
    before timing decode). On CUDA the region is bounded by events on the current stream, so
    host-side launch overhead inside `fn` counts but work queued by `setup` does not.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    with on_device(device):
        for _ in range(warmup):
            if setup:
                setup()
            fn()
        synchronize(device)
        samples = []
        for _ in range(repeats):
            if setup:
                setup()
            samples.append(_one(fn, device))
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "samples_s": samples, "repeats": repeats, "warmup": warmup,
            "clock": "cuda-events" if is_cuda(device) else "perf_counter"}


def calls_per_sample(rows: int) -> int:
    """How many calls of a linear on `rows` rows one timing sample holds: a decode-sized call
    takes microseconds, too few for one pair of CUDA events to resolve."""
    return 20 if rows <= 64 else 3


def seconds_per_call(call: Callable[[], object], device, calls: int, warmup: int,
                     repeats: int, graph: bool = True,
                     flush: Callable[[], object] | None = None) -> tuple[float, str]:
    """(median seconds per call, clock) of `calls` back-to-back calls. On CUDA with `graph` they
    are captured once in a CUDA graph and replayed: a call's host overhead (guards, launches: tens
    of microseconds) would otherwise hide kernels that take as long, as it did in the kernel
    bench's first H200 run. Where capture fails, or without `graph` (a call that will run eagerly,
    whose host overhead counts), plain back-to-back calls, and the clock says so.

    With `flush` (l2_flush), it runs before every call, and its own time, measured the same way,
    is subtracted: in a model gigabytes of other weights pass between two uses of a layer, so a
    layer reads its weights from memory, not from an L2 cache that the previous call filled (a
    Llama-3-8B int4 MLP weight, 28 MiB, fits in an H100's 50 MB L2; its bf16 form does not)."""
    if flush is None:
        seconds, clock = _per_run(call, device, calls, warmup, repeats, graph)
        return seconds / calls, clock

    def flushed():
        flush()
        call()
    total, clock = _per_run(flushed, device, calls, warmup, repeats, graph)
    alone, _ = _per_run(flush, device, calls, warmup, repeats, graph)
    if total > alone:
        return (total - alone) / calls, f"{clock}, L2 flushed before each call (flush subtracted)"
    # The flush's noise exceeds the call: keep the warm-cache figure, and say so.
    seconds, clock = _per_run(call, device, calls, warmup, repeats, graph)
    return seconds / calls, f"{clock}, warm L2 (the flush's noise exceeded the call)"


def l2_flush(device) -> Callable[[], object] | None:
    """A call that evicts the GPU's L2 cache by writing twice its size; None off CUDA (a CPU's
    caches are not what a GPU figure is about, and the CPU paths are timed as they are)."""
    if not is_cuda(device):
        return None
    props = torch.cuda.get_device_properties(torch.device(device))
    size = 2 * (getattr(props, "L2_cache_size", 0) or 50 << 20)
    return torch.empty(size, dtype=torch.uint8, device=device).zero_


def _per_run(step: Callable[[], object], device, calls: int, warmup: int, repeats: int,
             graph: bool) -> tuple[float, str]:
    """(median seconds of `calls` back-to-back steps, clock): replayed as one CUDA graph where
    `graph` asks for it and capture works."""
    def run():
        for _ in range(calls):
            step()
    timed, clock = run, "back-to-back calls (launch overhead included)"
    if is_cuda(device) and graph:
        try:
            with on_device(device):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm up off the default stream, as capture wants
                    run()
                torch.cuda.current_stream().wait_stream(stream)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    run()
            timed, clock = cuda_graph.replay, "CUDA graph replay"
        except Exception:  # not capturable: time the calls as they are
            torch.cuda.synchronize(device)
    return time_it(timed, device, warmup, repeats)["median_s"], clock


def _one(fn, device) -> float:
    if is_cuda(device):
        # Wait for setup's work first so that it does not run inside the timed region.
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def copy_bandwidth(device, nbytes: int, warmup: int = 2, repeats: int = 10) -> dict:
    """Device-to-device copy rate in bytes/s, counting bytes read + written (2 x nbytes)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    timing = time_it(lambda: dst.copy_(src), device, warmup, repeats)
    moved = 2 * src.nbytes
    del src, dst
    return {"bytes_per_s": moved / timing["median_s"], "buffer_bytes": moved // 2,
            "counting": "read + write", "median_s": timing["median_s"]}


def matmul_rate(device, n: int, dtype: torch.dtype, warmup: int = 2, repeats: int = 10) -> dict:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOP) in `dtype` with random operands."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_it(lambda: torch.matmul(a, b, out=out), device, warmup, repeats)
    del a, b, out
    return {"flop_per_s": 2 * n ** 3 / timing["median_s"], "n": n,
            "dtype": str(dtype).removeprefix("torch."), "median_s": timing["median_s"]}


def ceilings(device, copy_bytes: int, matmul_n: int, dtype: torch.dtype) -> dict:
    """Both ceilings, labelled with the device they were measured on."""
    return {"device": str(device), "copy": copy_bandwidth(device, copy_bytes),
            "matmul": matmul_rate(device, matmul_n, dtype)}


class PeakMemory:
    """Peak allocated bytes inside a `with` block on CUDA; None on CPU (no honest equivalent)."""

    def __init__(self, device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def restart(self) -> None:
        """Forget the peak so far (a decode row's prefill, run by its setup, is not decode)."""
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc):
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return False
