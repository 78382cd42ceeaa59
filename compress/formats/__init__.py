"""Quantized storage formats: one module per format, pure functions plus a small nn.Module."""

from compress.formats.int4 import Int4Linear
from compress.formats.int8 import Int8Linear

# format name (saved in compress.json) -> module class, for reloading checkpoints.
FORMATS = {cls.format: cls for cls in (Int8Linear, Int4Linear)}
