"""Quantized storage formats: one module per format, pure functions plus a small nn.Module."""

from compress.formats.bnb import BnbFP4Linear, BnbInt8Linear, BnbNF4Linear
from compress.formats.fp8 import FP8Linear
from compress.formats.int4 import Int4Linear
from compress.formats.int8 import Int8Linear
from compress.formats.w8a8 import W8A8Linear

# format name (saved in compress.json) -> module class, for reloading checkpoints.
FORMATS = {cls.format: cls for cls in (Int8Linear, Int4Linear, W8A8Linear, FP8Linear,
                                        BnbInt8Linear, BnbNF4Linear, BnbFP4Linear)}
