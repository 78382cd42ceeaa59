"""Triton kernels that read the stored int4 / int8 codes directly. Each weight byte is read once
and dequantized in registers.
- GEMV, for one row (decode): float32 accumulation, split along K so that a 4096-row output still
  fills the GPU. Made because the batch-1 decode step of the Llama-3-8B shape ran at 29% of its
  roofline with tinygemm (int4) and at 28.5% with inductor's fused GEMV (int8) on an H200.
- GEMM, for many rows (prefill): tiles of codes dequantized to the activations' dtype and fed to
  tl.dot. Made because dequantize-then-cuBLAS writes and re-reads a bf16 copy of every weight:
  int4 prefill ran at 0.51x bf16 there, int8 at 0.81x (reports/h200-llama3-8b).

Not chosen by default: a layer takes them only after `set_kernel("triton")` (`compress bench
--kernel int4=triton`). Measured on an H100 (int4 g128, Llama-3-8B shape, batch 1;
reports/h100-llama3-8b/run2-triton) they lose to the defaults: decode 5.41 ms/token against
tinygemm's 4.14 (the GEMV picks its configuration from GEMV_CONFIGS per shape), prefill of
2048 tokens 474 ms against 115 with dequantize + cuBLAS (the GEMM's tiles are fixed, not tuned).
evaluate/kernel_bench.py lists them beside the others. Correctness is tested on the CPU through
Triton's interpreter (TRITON_INTERPRET=1) where Triton is installed; on a GPU by the GPU-marked
tests.

Stored formats (compress/formats/int4.py, int8.py): int4 packs column 2j in the low nibble and
2j+1 in the high one, w = (q - zero) * scale with zero 8 when symmetric; int8 stores q - 128 and
zero - 128, so w = (stored_q - stored_zero) * scale, zero 0 when symmetric.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

TRITON_GEMV = "triton GEMV (compress)"
TRITON_GEMM = "triton dequantize-in-GEMM (compress)"
PER_CHANNEL_BLOCK_K = 256  # GEMV columns per step when one scale covers the whole row
GEMM_BLOCK_N = 128
GEMM_BLOCK_K = 64  # GEMM columns per step when one scale covers the whole row
GEMM_BLOCK_K_MAX = 128  # larger groups take several steps (shared memory: 3 stages of tiles)


def available(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels run on CUDA (or under TRITON_INTERPRET=1 in tests)"
    return None


def _interpreted() -> bool:
    import os

    # Triton decides at decoration time whether a kernel is interpreted: key the caches on it.
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _build_gemv(interpreted: bool):
    """The split-K GEMV for one row, built on first use: importing this module needs no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_w, stride_s, k_per_split,
             BITS: tl.constexpr, GROUPED: tl.constexpr, HAS_ZEROS: tl.constexpr,
             SYM_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUPS: tl.constexpr, ATOMIC: tl.constexpr):
        # Grouped: a step covers GROUPS whole groups (BLOCK_K = GROUPS x group size), so that
        # each row's load is one contiguous run of several groups' codes.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        k_first = tl.program_id(1) * k_per_split
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_total = 0.0  # per channel: the zero point multiplies the sum of x over the row
        for k0 in range(k_first, k_first + k_per_split, BLOCK_K):
            if BITS == 4:  # BLOCK_K / 2 bytes per row, two columns in each
                j = tl.arange(0, BLOCK_K // 2)
                cols = k0 + 2 * j
                ok = row_ok[:, None] & (cols < K)[None, :]
                byte = tl.load(w_ptr + rows[:, None] * stride_w + (k0 // 2 + j)[None, :],
                               mask=ok, other=0).to(tl.int32)
                x_even = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + cols + 1, mask=cols + 1 < K, other=0.0).to(tl.float32)
                prod = (byte & 15).to(tl.float32) * x_even[None, :] \
                    + (byte >> 4).to(tl.float32) * x_odd[None, :]
                xs = x_even + x_odd
                width: tl.constexpr = BLOCK_K // GROUPS // 2  # entries of prod per group
            else:
                cols = k0 + tl.arange(0, BLOCK_K)
                ok = row_ok[:, None] & (cols < K)[None, :]
                code = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=ok,
                               other=0).to(tl.float32)
                xs = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
                prod = code * xs[None, :]
                width: tl.constexpr = BLOCK_K // GROUPS
            if GROUPED:  # one scale (and zero) per row and group: sums per group first
                dot = tl.sum(tl.reshape(prod, [BLOCK_N, GROUPS, width]), axis=2)
                x_sum = tl.sum(tl.reshape(xs, [GROUPS, width]), axis=1)
                # Steps past K (the last split's) add nothing: their dot and x_sum are 0, and
                # the clamped group index keeps their scale loads in bounds.
                g = tl.minimum(k0 // (BLOCK_K // GROUPS) + tl.arange(0, GROUPS),
                               (K - 1) // (BLOCK_K // GROUPS))
                at = rows[:, None] * stride_s + g[None, :]
                scale = tl.load(s_ptr + at, mask=row_ok[:, None], other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zero = tl.load(z_ptr + at, mask=row_ok[:, None], other=0).to(tl.float32)
                else:
                    zero = SYM_ZERO
                acc += tl.sum(scale * (dot - zero * x_sum[None, :]), axis=1)
            else:  # per channel (int8 only): scale and zero apply to the finished sums
                acc += tl.sum(prod, axis=1)
                x_total += tl.sum(xs, axis=0)
        if not GROUPED:
            scale = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + rows * stride_s, mask=row_ok, other=0).to(tl.float32)
                acc = scale * (acc - zero * x_total)
            else:
                acc = scale * acc
        if ATOMIC:
            tl.atomic_add(out_ptr + rows, acc, mask=row_ok)
        else:
            tl.store(out_ptr + rows, acc, mask=row_ok)

    return gemv


@functools.cache
def _build_gemm(interpreted: bool):
    """The tiled GEMM for many rows: each [BLOCK_K, BLOCK_N] tile of codes is dequantized in
    registers to the activations' dtype (as the reference's dequantize rounds it) and fed to
    tl.dot, so no bf16 copy of the weight is written and read back."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemm(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_s,
             stride_o, BITS: tl.constexpr, GROUPED: tl.constexpr, HAS_ZEROS: tl.constexpr,
             SYM_ZERO: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        if not GROUPED or not HAS_ZEROS:
            zero = SYM_ZERO
        if not GROUPED and HAS_ZEROS:  # per channel: one zero per output column
            zero = tl.load(z_ptr + rn * stride_s, mask=n_ok, other=0).to(tl.float32)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            tile_ok = k_ok[:, None] & n_ok[None, :]
            if BITS == 4:  # column k sits in byte k // 2, low nibble when k is even
                byte = tl.load(w_ptr + rn[None, :] * stride_w + (rk // 2)[:, None],
                               mask=tile_ok, other=0).to(tl.int32)
                q = ((byte >> ((rk % 2) * 4)[:, None]) & 15).to(tl.float32)
            else:
                q = tl.load(w_ptr + rn[None, :] * stride_w + rk[:, None], mask=tile_ok,
                            other=0).to(tl.float32)
            if GROUPED:  # BLOCK_K divides the group: one scale (and zero) per column per step
                g = k0 // GROUP
                scale = tl.load(s_ptr + rn * stride_s + g, mask=n_ok, other=0.0)
                if HAS_ZEROS:
                    zero = tl.load(z_ptr + rn * stride_s + g, mask=n_ok, other=0)
                    zero = zero.to(tl.float32)[None, :]
                w = (q - zero) * scale.to(tl.float32)[None, :]
            else:  # integers up to 255 in magnitude: exact in bf16; scaled after the sum
                w = q - zero
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        if not GROUPED:
            acc = acc * tl.load(s_ptr + rn * stride_s, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    return gemm


@dataclass
class TritonLinear:
    """Launch plans for one layer's shape, built once (outside any compiled region) and called
    with the layer's buffers: the split-K GEMV for one row, the tiled GEMM for `gemm_min_rows`
    rows or more; None in between (the layer's own kernels)."""
    gemv: object
    gemm: object
    bits: int
    group_size: int
    out_features: int
    in_features: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int
    gemm_min_rows: int
    gemv_warps: int = 4
    groups_per_step: int = 1  # grouped GEMV: whole groups per K step (block_k = this x group)
    tuning: str = "default"  # how the GEMV configuration was chosen

    def __call__(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None) -> torch.Tensor | None:
        """[rows, K] activations -> [rows, N] in their dtype, or None for rows it leaves alone."""
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            return self._gemv(x, codes, scales, zeros)
        if rows >= self.gemm_min_rows:
            return self._gemm(x.reshape(rows, -1), codes, scales, zeros)
        return None

    def _flags(self, zeros) -> dict:
        return dict(BITS=self.bits, GROUPED=self.group_size > 0, HAS_ZEROS=zeros is not None,
                    SYM_ZERO=8.0 if self.bits == 4 else 0.0)

    def _gemv(self, x, codes, scales, zeros):
        n = self.out_features
        out = torch.zeros(n, device=x.device, dtype=torch.float32)
        grid = ((n + self.block_n - 1) // self.block_n, self.split_k)
        self.gemv[grid](
            x.reshape(-1), codes, scales, zeros if zeros is not None else scales, out, n,
            self.in_features, codes.stride(0), scales.stride(0), self.k_per_split,
            BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUPS=self.groups_per_step,
            ATOMIC=self.split_k > 1, num_warps=self.gemv_warps, **self._flags(zeros))
        return out.to(x.dtype).reshape(1, n)

    def _gemm(self, x, codes, scales, zeros):
        x = x.contiguous()
        m, n = x.shape[0], self.out_features
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        block_m = 64 if m <= 64 else 128
        grid = ((m + block_m - 1) // block_m, (n + GEMM_BLOCK_N - 1) // GEMM_BLOCK_N)
        self.gemm[grid](
            x, codes, scales, zeros if zeros is not None else scales, out, m, n,
            self.in_features, x.stride(0), codes.stride(0), scales.stride(0), out.stride(0),
            GROUP=self.group_size, BLOCK_M=block_m, BLOCK_N=GEMM_BLOCK_N,
            BLOCK_K=min(self.group_size, GEMM_BLOCK_K_MAX) or GEMM_BLOCK_K,
            num_warps=8 if block_m == 128 else 4, num_stages=3,
            # float32 activations: full precision, as the reference; tl.dot's default on NVIDIA
            # rounds them to TF32 (about 1e-3 relative error)
            PRECISION="ieee" if x.dtype == torch.float32 else None, **self._flags(zeros))
        return out


# GEMV configurations tried on a GPU, per layer shape: (rows per program, warps, groups per K
# step). More groups per step make each row's load a longer contiguous run (a group of 64 int4
# codes is only 32 bytes); the first entry is the untuned default.
GEMV_CONFIGS = ((32, 4, 1), (64, 4, 1), (64, 8, 1), (32, 4, 2), (32, 4, 4), (64, 8, 2),
                (16, 4, 4))


def plan(out_features: int, in_features: int, bits: int, group_size: int, device: torch.device,
         gemm_min_rows: int = 2, block_n: int = 32, split_k: int | None = None,
         dtype: torch.dtype = torch.bfloat16, has_zeros: bool = False,
         tune: bool = False, groups_per_step: int = 1) -> TritonLinear:
    """The launch plans of a layer: codes int4 packed uint8 [N, K/2] or int8 [N, K], scales
    [N, groups]; group_size 0 (one scale per row) is int8 only. split_k None: about four
    programs per SM for the GEMV, never fewer than one K step each. tune (CUDA): the GEMV's
    rows per program, warps and groups per step are the fastest of GEMV_CONFIGS for this shape,
    timed once per shape on random codes (the time does not depend on their values)."""
    if bits == 4 and group_size == 0:
        raise ValueError("the Triton kernels take grouped int4 only")
    if group_size and (group_size < 16 or group_size & (group_size - 1)):
        # A K step spans whole groups (tl.arange takes powers of two, tl.dot K >= 16); a group
        # of 192 would have one step read two groups under the first one's scale.
        raise ValueError(f"the Triton kernels take group sizes that are powers of two from 16, "
                         f"got {group_size}")
    interpreted = _interpreted()
    warps, tuning = 4, "default"
    if tune and device.type == "cuda" and not interpreted:
        try:
            block_n, warps, groups_per_step = _tuned_gemv(
                out_features, in_features, bits, group_size, device.index, dtype, has_zeros)
            tuning = (f"tuned: {block_n} rows per program, {warps} warps, "
                      f"{groups_per_step} groups per step")
        except Exception as exc:  # the defaults still run; say why they were kept
            tuning = f"default (tuning failed: {type(exc).__name__}: {exc})"[:200]
    if not group_size:
        groups_per_step = 1  # per channel: the step width is PER_CHANNEL_BLOCK_K
    block_k = group_size * groups_per_step or PER_CHANNEL_BLOCK_K
    split_k, k_per_split = _split(out_features, in_features, block_k, block_n, device, split_k)
    return TritonLinear(_build_gemv(interpreted), _build_gemm(interpreted), bits, group_size,
                        out_features, in_features, block_n, block_k, split_k, k_per_split,
                        gemm_min_rows, warps, groups_per_step, tuning)


def _split(out_features: int, in_features: int, block_k: int, block_n: int,
           device: torch.device, split_k: int | None) -> tuple[int, int]:
    """(programs along K, columns each) for the GEMV."""
    steps = -(-in_features // block_k)
    if split_k is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 4
        split_k = max(1, min(steps, -(-4 * sms // -(-out_features // block_n))))
    steps_per_split = -(-steps // split_k)
    return -(-steps // steps_per_split), steps_per_split * block_k


@functools.cache
def _tuned_gemv(out_features: int, in_features: int, bits: int, group_size: int,
                device_index: int | None, dtype: torch.dtype,
                has_zeros: bool) -> tuple[int, int, int]:
    """The fastest (rows per program, warps, groups per step) of GEMV_CONFIGS, by triton's
    do_bench (L2 flushed between runs, as a decode step's weights are not in cache)."""
    from triton.testing import do_bench

    device = torch.device("cuda", device_index)
    groups = in_features // group_size if group_size else 1
    codes = torch.randint(0, 255, (out_features, in_features * bits // 8), device=device,
                          dtype=torch.uint8)
    if bits == 8:
        codes = codes.view(torch.int8)
    scales = torch.rand(out_features, groups, device=device, dtype=dtype) / 100
    zeros = torch.randint(0, 15, (out_features, groups), device=device,
                          dtype=torch.uint8 if bits == 4 else torch.int8) if has_zeros else None
    x = torch.randn(1, in_features, device=device, dtype=dtype)
    timed = []
    configs = GEMV_CONFIGS if group_size else {(n, w, 1) for n, w, _ in GEMV_CONFIGS}
    for block_n, warps, groups in configs:
        candidate = plan(out_features, in_features, bits, group_size, device, block_n=block_n,
                         groups_per_step=groups)
        candidate.gemv_warps = warps
        seconds = do_bench(lambda: candidate._gemv(x, codes, scales, zeros), warmup=5, rep=25)
        timed.append((seconds, block_n, warps, groups))
    return min(timed)[1:]
