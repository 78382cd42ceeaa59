"""Pruning: mask selection (masks, sparsegpt) apart from materializing it (dense zeros,
semi-structured 2:4, structured shrinking of tensors and config)."""
