"""compress: LLM compression (quantization, pruning) and honest before/after evaluation."""

__version__ = "0.1.0"
