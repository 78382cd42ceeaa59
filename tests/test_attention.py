"""GQA decode attention (evaluate/attention.py): the same logits as transformers' SDPA with
repeat_kv, eagerly and compiled, and the model's own attention back after undo()."""
import copy

import pytest
import torch

from compress.evaluate.attention import NAME, use_gqa_decode_attention
from compress.evaluate.engine import Engine, random_tokens


def _lively():
    from compress.sources import load_random

    model = load_random("tiny").model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.15, generator=torch.Generator().manual_seed(param.numel()))
    return model


def test_gqa_decode_gives_the_sdpa_logits_eager_and_compiled():
    model = _lively()
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    swapped = copy.deepcopy(model)
    swap = use_gqa_decode_attention(swapped)
    assert swapped.config._attn_implementation == NAME
    ids = random_tokens(2, 10, 256, "cpu", seed=8)
    for compiled in (False, True):
        plain, gqa = Engine(model), Engine(swapped)
        for engine in (plain, gqa):
            engine.allocate(2, 24)
            if compiled:
                engine.compile_decode()
        logits = []
        for engine in (plain, gqa):
            first = engine.prefill(ids)
            positions = engine.next_positions(10)
            step = engine.decode_step(first.argmax(-1), positions).clone()
            logits.append((first, step))
        torch.testing.assert_close(logits[1][0], logits[0][0], rtol=1e-5, atol=1e-5)  # prefill
        torch.testing.assert_close(logits[1][1], logits[0][1], rtol=1e-5, atol=1e-5)  # decode
        assert torch.equal(gqa.generate(ids, 8).tokens, plain.generate(ids, 8).tokens)
    swap.undo()
    assert swapped.config._attn_implementation == "sdpa"


def test_models_not_on_sdpa_are_left_alone():
    model = _lively()
    model.config._attn_implementation = "eager"
    assert use_gqa_decode_attention(model) is None
    assert model.config._attn_implementation == "eager"


def test_a_decode_step_reads_the_cached_heads_as_stored(monkeypatch):
    """The SDPA call sees kv_heads, not heads, and the group's queries as rows: no repeat_kv."""
    import compress.evaluate.attention as attention

    model = _lively()
    use_gqa_decode_attention(model)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((tuple(query.shape), tuple(key.shape)))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    engine = Engine(model)
    engine.allocate(1, 16)
    first = engine.prefill(random_tokens(1, 6, 256, "cpu"))
    seen.clear()  # the prefill's calls (transformers' own path)
    engine.decode_step(first.argmax(-1), engine.next_positions(6))
    config = model.config
    kv = config.num_key_value_heads
    groups = config.num_attention_heads // kv
    assert seen == [((1, kv, groups, config.head_dim), (1, kv, 16, config.head_dim))] * \
        config.num_hidden_layers


def test_bench_records_the_swap(tiny_bench):
    doc, md = tiny_bench("--gqa-decode")
    assert doc["protocol"]["gqa_decode"] is True and doc["rows"][0]["gqa_decode_attention"]
    assert "GQA decode attention" in md


@pytest.mark.gpu
def test_gqa_decode_on_cuda_under_cuda_graphs_gives_the_sdpa_logits(first_compiled_step):
    from compress.sources import load_random

    model = load_random("llama3.2-1b", torch.bfloat16, device="cuda").model  # 4 heads a group
    ids = random_tokens(2, 16, model.config.vocab_size, "cuda", seed=3)
    plain = first_compiled_step(model, ids, 48).clone()
    swap = use_gqa_decode_attention(model)
    torch.testing.assert_close(first_compiled_step(model, ids, 48), plain, rtol=2e-2, atol=2e-2)
    swap.undo()


def test_models_without_key_value_groups_are_left_alone():
    """Multi-head attention has no repeat_kv copy to spare: no swap, and a bench row says so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == "sdpa"
    assert use_gqa_decode_attention(model) is None
    assert model.config._attn_implementation == "sdpa"


def test_reports_name_the_gqa_decode_attention_only_where_it_ran():
    from compress.reports.content import runtime_options

    proto = {"compile": False, "gqa_decode": True}
    assert runtime_options(proto, [{"gqa_decode_attention": True}]) == \
        "False (GQA decode attention)"
    assert "not used: no key/value groups" in runtime_options(proto,
                                                               [{"gqa_decode_attention": False}])
