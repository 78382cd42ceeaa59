"""bitsandbytes formats, stored as compress modules with explicit buffers so checkpoints reload exactly.

LLM.int8 (`bnb-int8`): `qweight` int8 [out, in] and `scales` float32 [out] (row absmax), exactly
bitsandbytes' CB / SCB. At run time each token is quantized to int8 except the input columns that
hold an activation of magnitude >= `threshold` (6.0 in the paper): those columns are multiplied in
floating point against the dequantized weight columns (the mixed-precision decomposition).

NF4 / FP4 (`bnb-nf4`, `bnb-fp4`): bitsandbytes' packed 4-bit codes (`qweight` uint8, two codes per
byte over the flattened [out, in] weight), one absmax per `blocksize` values (`absmax`) and the
16-entry code book (`quant_map`). With double quantization the absmax values are themselves
8-bit (`absmax` uint8) with their own blockwise state (`nested_absmax`, `nested_quant_map`,
`offset`), saving about 0.37 bits per weight.

The kernels are bitsandbytes' own (int8_vectorwise_quant, int8_mixed_scaled_mm, quantize_4bit,
matmul_4bit); bitsandbytes >= 0.50 runs all of them on CPU too. It is imported on first use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.errors import UserError
from compress.formats.base import FLOAT_DTYPES, QuantizedLinear, autocast_input

INT8_SCALE = 127.0
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256       # bitsandbytes quantizes absmax values in blocks of 256


def bnb_functional():
    """bitsandbytes.functional, or a UserError that says how to get it."""
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:
        raise UserError("the bnb-int8/bnb-nf4/bnb-fp4 formats need bitsandbytes; "
                        "install it with: pip install bitsandbytes") from exc
    return bnb_f


# ---- LLM.int8 ---------------------------------------------------------------------------------

def int8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' weight quantization (Int8Params): fp16 rows, symmetric int8 per row."""
    cb, scb, _ = bnb_functional().int8_vectorwise_quant(w.to(torch.float16).contiguous())
    return cb, scb


def llm_int8_reference(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8 in plain torch, following bitsandbytes step by step (for tests and as a fallback).

    x [tokens, in]. Activations are rounded through fp16 like bitsandbytes does; outlier entries
    (|x| >= threshold) do not count towards their row's scale, and whole outlier columns leave the
    int8 product and are added back as a float product with the dequantized weight columns.
    """
    a = x.to(torch.float16).float()
    outliers = a.abs() >= threshold if threshold > 0 else torch.zeros_like(a, dtype=torch.bool)
    cols = outliers.any(dim=0)
    row_max = a.masked_fill(outliers, 0).abs().amax(dim=1, keepdim=True)
    # An all-zero (or all-outlier) token has no int8 part: code 0, not 0 * inf = NaN.
    ca = torch.round(a * torch.where(row_max > 0, INT8_SCALE / row_max, 0.0)).masked_fill(cols, 0)
    w_int = cb.float()
    # Exact in float64: |sum| <= 127 * 127 * in, far below 2**53.
    acc = (ca.double() @ w_int.double().t()).float()
    out = acc * (row_max * scb.float()[None, :]) / (INT8_SCALE * INT8_SCALE)
    if cols.any():
        w_cols = w_int[:, cols] * scb.float()[:, None] / INT8_SCALE
        out = out + x.float()[:, cols] @ w_cols.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


class BnbInt8Linear(QuantizedLinear):
    format = "bnb-int8"
    fixed_dtype_buffers = ("scales",)  # bitsandbytes' kernels take float32 row statistics

    def __init__(self, in_features: int, out_features: int, threshold: float, bias: bool,
                 dtype: torch.dtype):
        self.threshold = float(threshold)
        super().__init__(in_features, out_features, 8, 0, True, bias, dtype)

    def _register_storage(self, dtype: torch.dtype) -> None:
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features,
                                                    dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(self.out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: torch.nn.Module, threshold: float) -> "BnbInt8Linear":
        w = linear.weight.data
        layer = cls(linear.in_features, linear.out_features, threshold, linear.bias is not None,
                    w.dtype)
        cb, scb = int8_quantize_weight(w)
        layer.qweight.copy_(cb)
        layer.scales.copy_(scb)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer.to(w.device)

    def spec(self) -> dict:
        return {**super().spec(), "threshold": self.threshold}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "BnbInt8Linear":
        return cls(spec["in_features"], spec["out_features"], spec["threshold"], spec["bias"], dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.qweight.float() * (self.scales[:, None] / INT8_SCALE)
        return w.to(dtype or torch.float32)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = llm_int8_reference(flat, self.qweight, self.scales, self.threshold, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' inference path of MatMul8bitLt, called directly: the autograd wrapper
        `bnb.matmul` logs a warning on every call whose input is not fp16."""
        x = autocast_input(x)
        bnb_f = bnb_functional()
        flat = x.reshape(-1, self.in_features)
        ca, sca, outlier_cols = bnb_f.int8_vectorwise_quant(flat.to(torch.float16),
                                                            threshold=self.threshold)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.threshold > 0:
            out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(
                flat, ca, self.qweight, sca, self.scales, outlier_cols, bias)
            self.kernel = "bitsandbytes.int8_mixed_scaled_mm"
        else:
            out = torch.ops.bitsandbytes.int8_scaled_mm(ca, self.qweight, sca, self.scales,
                                                        bias=bias, dtype=x.dtype)
            self.kernel = "bitsandbytes.int8_scaled_mm"
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, LLM.int8 threshold={self.threshold}"


# ---- NF4 / FP4 --------------------------------------------------------------------------------

class Bnb4bitLinear(QuantizedLinear):
    """Shared body of the NF4 and FP4 layers; subclasses fix `quant_type` and `format`."""

    quant_type = ""
    fixed_dtype_buffers = ("quant_map", "absmax", "nested_absmax", "nested_quant_map", "offset")

    def __init__(self, in_features: int, out_features: int, blocksize: int, double_quant: bool,
                 compute_dtype: str, bias: bool, dtype: torch.dtype):
        check_4bit_options(blocksize, compute_dtype)
        self.double_quant, self.compute_dtype = bool(double_quant), compute_dtype
        super().__init__(in_features, out_features, 4, blocksize, True, bias, dtype)

    def _register_storage(self, dtype: torch.dtype) -> None:
        n = self.in_features * self.out_features
        blocks = -(-n // self.group_size)
        self.register_buffer("qweight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8))
        self.register_buffer("quant_map", torch.zeros(16, dtype=torch.float32))
        if self.double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8))
            self.register_buffer("nested_absmax", torch.zeros(-(-blocks // NESTED_BLOCKSIZE),
                                                              dtype=torch.float32))
            self.register_buffer("nested_quant_map", torch.zeros(256, dtype=torch.float32))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: torch.nn.Module, blocksize: int, double_quant: bool,
                   compute_dtype: str | None) -> "Bnb4bitLinear":
        w = linear.weight.data
        compute_dtype = compute_dtype or str(w.dtype).removeprefix("torch.")
        layer = cls(linear.in_features, linear.out_features, blocksize, double_quant,
                    compute_dtype, linear.bias is not None, w.dtype).to(w.device)
        packed, state = bnb_functional().quantize_4bit(
            w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
            quant_type=cls.quant_type)
        layer.qweight.copy_(packed.reshape(layer.qweight.shape))
        layer.quant_map.copy_(state.code)
        layer.absmax.copy_(state.absmax)
        if double_quant:
            layer.nested_absmax.copy_(state.state2.absmax)
            layer.nested_quant_map.copy_(state.state2.code)
            layer.offset.copy_(state.offset)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer

    def spec(self) -> dict:
        return {**super().spec(), "quant_type": self.quant_type,
                "double_quant": self.double_quant, "compute_dtype": self.compute_dtype}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> "Bnb4bitLinear":
        return cls(spec["in_features"], spec["out_features"], spec["group_size"],
                   spec["double_quant"], spec["compute_dtype"], spec["bias"], dtype)

    def quant_state(self, dtype: torch.dtype):
        """bitsandbytes' QuantState, rebuilt from the buffers; `dtype` is what dequantizing yields."""
        QuantState = bnb_functional().QuantState
        nested = QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                            blocksize=NESTED_BLOCKSIZE, dtype=torch.float32) \
            if self.double_quant else None
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=self.quant_map, blocksize=self.group_size,
                          quant_type=self.quant_type, dtype=dtype,
                          offset=self.offset if self.double_quant else None, state2=nested)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or FLOAT_DTYPES[self.compute_dtype]
        return bnb_functional().dequantize_4bit(self.qweight, self.quant_state(dtype))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = FLOAT_DTYPES[self.compute_dtype]
        bias = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), self.dequantize(compute), bias).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        x = autocast_input(x)
        compute = FLOAT_DTYPES[self.compute_dtype]
        bias = None if self.bias is None else self.bias.to(compute)
        out = bnb.matmul_4bit(x.to(compute), self.qweight.t(), quant_state=self.quant_state(compute),
                              bias=bias)
        self.kernel = "bitsandbytes.matmul_4bit"
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type} "
                f"blocksize={self.group_size}, double_quant={self.double_quant}, "
                f"compute={self.compute_dtype}")


class BnbNF4Linear(Bnb4bitLinear):
    format = "bnb-nf4"
    quant_type = "nf4"


class BnbFP4Linear(Bnb4bitLinear):
    format = "bnb-fp4"
    quant_type = "fp4"


def check_4bit_options(blocksize: int, compute_dtype: str | None) -> None:
    if blocksize not in BLOCKSIZES:
        raise UserError(f"bitsandbytes 4-bit blocksize must be one of "
                        f"{', '.join(map(str, BLOCKSIZES))}; got {blocksize}")
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise UserError(f"compute_dtype must be one of {', '.join(FLOAT_DTYPES)} "
                        f"(or unset: the model's dtype); got {compute_dtype!r}")
