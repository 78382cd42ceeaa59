"""The inference engine: same tokens as HF generate, static cache == no cache, EOS, sampling."""
import pytest
import torch
import transformers

from compress.errors import UserError
from compress.evaluate.engine import Engine, Sampling, random_tokens, select_tokens
from compress.sources import load_random


@pytest.fixture(scope="module")
def lively():
    """The tiny Llama with larger weights: std-0.02 random models repeat one token forever,
    which would make token-for-token comparisons vacuous."""
    model = load_random("tiny").model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3 if "embed" in name else 0.15,
                              generator=torch.Generator().manual_seed(len(name)))
    return model


def test_greedy_matches_hf_generate_token_for_token(lively):
    ids = random_tokens(3, 12, 256, "cpu", seed=3)
    engine = Engine(lively)
    engine.allocate(3, 48)
    ours = engine.generate(ids, 30).tokens
    hf = lively.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                         do_sample=False, eos_token_id=None, pad_token_id=257)[:, 12:]
    assert len(set(ours.flatten().tolist())) > 10  # a real sequence, not one repeated token
    assert torch.equal(ours, hf)


def test_left_padded_batch_matches_hf_generate(lively):
    ids = random_tokens(3, 10, 256, "cpu", seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 257
    engine = Engine(lively)
    engine.allocate(3, 32)
    ours = engine.generate(ids, 16, attention_mask=mask).tokens
    hf = lively.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                         eos_token_id=None, pad_token_id=257)[:, 10:]
    assert torch.equal(ours, hf)


def test_static_cache_logits_equal_a_full_forward_without_cache(lively):
    ids = random_tokens(2, 9, 256, "cpu", seed=5)
    engine = Engine(lively)
    engine.allocate(2, 24)
    step_logits = [engine.prefill(ids)]
    positions = engine.next_positions(9)
    tokens = []
    for _ in range(6):
        token = step_logits[-1].argmax(-1)
        tokens.append(token)
        step_logits.append(engine.decode_step(token, positions).clone())
        positions += 1
    full_ids = torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)
    with torch.no_grad():
        full = lively(full_ids, use_cache=False).logits
    for i, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, 8 + i], rtol=1e-4, atol=1e-4)


def test_eos_stops_its_sequence_while_the_others_continue(lively):
    ids = random_tokens(3, 12, 256, "cpu", seed=3)
    engine = Engine(lively)
    engine.allocate(3, 60)
    free = engine.generate(ids, 40).tokens
    # EOS = a token that sequence 0 emits at step 5 and sequence 2 never emits.
    eos = next(t for t in free[0, 5:].tolist() if t not in free[2].tolist())
    stop = free[0].tolist().index(eos)
    out = engine.generate(ids, 40, eos_token_id=eos, pad_token_id=0)
    assert out.lengths[0] == stop + 1
    assert torch.equal(out.tokens[0, :stop + 1], free[0, :stop + 1])
    assert torch.all(out.tokens[0, stop + 1:] == 0)
    assert out.lengths[2] == 40 and torch.equal(out.tokens[2], free[2])
    assert out.tokens.shape[1] == 40


def test_generation_ends_early_when_every_sequence_hit_eos(lively):
    ids = random_tokens(1, 12, 256, "cpu", seed=3)
    engine = Engine(lively)
    engine.allocate(1, 60)
    free = engine.generate(ids, 20).tokens
    out = engine.generate(ids, 20, eos_token_id=int(free[0, 3]))
    assert out.tokens.shape[1] <= 4 and out.lengths[0] == out.tokens.shape[1]


def test_sampling_is_reproducible_with_a_seed_and_differs_with_another(lively):
    ids = random_tokens(2, 8, 256, "cpu", seed=6)
    engine = Engine(lively)
    engine.allocate(2, 40)
    first = engine.generate(ids, 24, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=1))
    again = engine.generate(ids, 24, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=1))
    other = engine.generate(ids, 24, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=2))
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = select_tokens(logits, Sampling(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}
    # softmax mass: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps the first two tokens only.
    nucleus = select_tokens(logits, Sampling(temperature=1.0, top_p=0.8), gen)
    assert set(nucleus.tolist()) == {0, 1}
    assert torch.equal(select_tokens(logits, Sampling(), gen), torch.zeros(2000, dtype=torch.long))


def test_top_p_keeps_the_smallest_set_holding_top_p_as_transformers_does():
    from transformers import TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    # Four equal tokens, exact quarters: top_p 0.5 keeps two, 0.51 three (transformers alike).
    for top_p, kept in ((0.5, 2), (0.51, 3), (0.25, 1)):
        drawn = select_tokens(torch.zeros(4000, 4), Sampling(temperature=1.0, top_p=top_p), gen)
        assert len(set(drawn.tolist())) == kept
        hf = TopPLogitsWarper(top_p)(None, torch.zeros(1, 4))
        assert int(torch.isfinite(hf).sum()) == kept
    logits = torch.randn(8, 6, generator=gen)
    for row in logits:
        allowed = set(torch.isfinite(TopPLogitsWarper(0.7)(None, row[None]))[0].nonzero()[:, 0]
                      .tolist())
        drawn = select_tokens(row.repeat(3000, 1), Sampling(temperature=1.0, top_p=0.7), gen)
        assert set(drawn.tolist()) == allowed


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_the_softmax_at_the_temperature(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(20000, 1)
    drawn = select_tokens(logits, Sampling(temperature=temperature),
                          torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=3).float() / len(drawn)
    torch.testing.assert_close(frequencies, (logits[0] / temperature).softmax(-1), rtol=0,
                               atol=0.015)


def test_bad_settings_are_user_errors(lively):
    with pytest.raises(UserError):
        Sampling(top_p=0.0)
    with pytest.raises(UserError):
        Sampling(temperature=-1.0)
    engine = Engine(lively)
    engine.allocate(1, 16)
    with pytest.raises(UserError, match="exceed the cache"):
        engine.generate(random_tokens(1, 10, 256, "cpu"), 8)


def test_the_cache_holds_exactly_what_a_run_feeds_back(lively):
    """A prompt may fill the cache (a 2048-token prefill on a 2048-position model); the last new
    token of a generation comes from the last logits and needs no slot."""
    engine = Engine(lively)
    engine.allocate(1, 16)
    ids = random_tokens(1, 16, 256, "cpu")
    with torch.no_grad():
        expected = lively(ids).logits[:, -1]
    torch.testing.assert_close(engine.prefill(ids), expected, rtol=1e-5, atol=1e-5)
    assert engine.generate(ids[:, :10], 7, stop_on_eos=False).tokens.shape == (1, 7)


def test_kv_cache_bytes_are_the_static_allocation(lively):
    engine = Engine(lively)
    engine.allocate(3, 40)
    config = lively.config
    expected = 2 * config.num_hidden_layers * 3 * config.num_key_value_heads * 40 * \
        config.head_dim * 4
    assert engine.kv_cache_bytes() == expected


def test_engines_compiled_one_after_another_stay_under_dynamo_limits(lively):
    """A sweep compiles one engine per model in one process; each compile starts afresh, so the
    n-th model does not fail with FailOnRecompileLimitHit (as the fifth did on an H200)."""
    import copy

    import torch._dynamo

    from compress.recipe import apply_recipe, recipe_from_dict

    ids = random_tokens(1, 6, 256, "cpu", seed=7)
    # config.patch, not monkeypatch: restoring by setattr leaves dynamo's config unreadable
    # for the tests after this one (torch 2.13).
    with torch._dynamo.config.patch(recompile_limit=1):
        for bits in (None, 8, 4):  # different layer classes: the guards of a compiled step fail
            model = copy.deepcopy(lively)
            if bits:
                model = apply_recipe(model, recipe_from_dict(
                    {"passes": [{"pass": "rtn", "bits": bits, "group_size": 32}]}, "rtn"))
            eager, compiled = Engine(model), Engine(model)
            eager.allocate(1, 16)
            compiled.allocate(1, 16)
            compiled.compile_decode()
            assert torch.equal(compiled.generate(ids, 5).tokens, eager.generate(ids, 5).tokens)


def test_tuned_compile_gives_the_eager_tokens_and_restores_inductor_config(lively, monkeypatch):
    from torch._inductor import config as inductor_config

    seen = []
    compile_fn = torch.compile

    def spy(fn, **kwargs):  # inductor reads its config when the first call compiles
        compiled = compile_fn(fn, **kwargs)

        def call(*args):
            seen.append(inductor_config.coordinate_descent_tuning)
            return compiled(*args)
        return call

    monkeypatch.setattr(torch, "compile", spy)
    ids = random_tokens(1, 6, 256, "cpu", seed=5)
    eager, tuned = Engine(lively), Engine(lively)
    eager.allocate(1, 16)
    tuned.allocate(1, 16)
    tuned.compile_decode(tune=True)
    assert seen[0] is True and inductor_config.coordinate_descent_tuning is False
    assert torch.equal(tuned.generate(ids, 5).tokens, eager.generate(ids, 5).tokens)


def test_tune_kernels_needs_compile(capsys):
    from compress.cli import main

    assert main(["bench", "random:tiny", "--tune-kernels", "--peers", "none"]) == 2
    assert "--tune-kernels tunes the compiled decode step's kernels: it needs --compile" in \
        capsys.readouterr().err


def test_compiled_prefill_gives_the_eager_logits(lively):
    ids = random_tokens(2, 12, 256, "cpu", seed=6)
    eager, compiled = Engine(lively), Engine(lively)
    eager.allocate(2, 32)
    compiled.allocate(2, 32)
    compiled.compile_prefill()
    torch.testing.assert_close(compiled.prefill(ids), eager.prefill(ids), rtol=1e-5, atol=1e-5)
    # The cache it filled serves the decode steps as the eager one's does.
    assert torch.equal(compiled.generate(ids, 6).tokens, eager.generate(ids, 6).tokens)
    compiled.compile_prefill(False)
    assert compiled._prefill_forward == compiled._eager_prefill_forward


def test_bench_with_compiled_prefill_reports_its_compile_time(tiny_bench):
    doc, md = tiny_bench("--compile-prefill")
    (prefill,) = doc["rows"][0]["prefill"]
    assert doc["protocol"]["compile_prefill"] is True and prefill["compile_s"] > 0
    assert prefill["kernels"]["mlp.down_proj"] == "Linear: torch.nn.functional.linear"
    assert "prefill compiled" in md


def test_compiling_the_step_fits_a_short_cache(lively, monkeypatch):
    # The compile run's own prompt and steps must fit what a benchmark allocated (prompt 4 + 2
    # new tokens = 6 slots); the compiler itself is not what this checks.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    engine = Engine(lively)
    for slots in (6, 3, 2):
        engine.allocate(1, slots)
        assert engine.compile_decode() >= 0


def test_a_compiled_step_is_not_compiled_again_by_the_bench_s_timed_calls(lively):
    """compile_decode captures the step through `generate`; the bench's setup then feeds it
    positions from `next_positions` outside inference mode. The same kind of tensor both times:
    otherwise dynamo compiles again at the first timed call (200 ms in a 0.5 ms step on a CPU),
    a compile that compile_s leaves out."""
    from torch._dynamo.utils import counters

    engine = Engine(lively)
    engine.allocate(1, 16)
    engine.compile_decode()
    graphs = counters["stats"]["unique_graphs"]
    ids = random_tokens(1, 8, 256, "cpu", seed=2)
    logits = engine.prefill(ids)
    engine.decode(logits, engine.next_positions(8), 4, stop_on_eos=False)
    assert counters["stats"]["unique_graphs"] == graphs


def test_top_k_one_below_the_vocabulary_still_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(4000, 1)
    drawn = select_tokens(logits, Sampling(temperature=1.0, top_k=4), torch.Generator().manual_seed(0))
    assert 4 not in set(drawn.tolist())


def test_an_early_stop_keeps_the_eos_token(lively):
    ids = random_tokens(1, 12, 256, "cpu", seed=3)
    engine = Engine(lively)
    engine.allocate(1, 60)
    free = engine.generate(ids, 20).tokens[0].tolist()
    eos = free[3]
    out = engine.generate(ids, 20, eos_token_id=eos)
    stop = free.index(eos)
    assert out.tokens[0].tolist() == free[:stop + 1] and int(out.lengths[0]) == stop + 1


def test_a_second_prompt_on_a_sliding_window_model_is_not_served_a_full_cache():
    """Mistral configs carry sliding_window (4096 by default), so the static cache has
    StaticSlidingWindowLayer, with a Python-int fill counter beside the tensor one: reset()
    must rewind both, or every prefill after the first (the bench's repeats) attends to a cache
    it believes full and gives other logits."""
    model = _mistral(16)
    engine = Engine(model)
    for length in (8, 24):  # inside the window, and past it
        ids = random_tokens(1, length, 320, "cpu", seed=length)
        with torch.no_grad():
            want = model(ids).logits[:, -1]
        engine.allocate(1, 40)
        for _ in range(3):
            torch.testing.assert_close(engine.prefill(ids), want, rtol=1e-4, atol=1e-4)
        first = engine.generate(ids, 8).tokens
        assert torch.equal(engine.generate(ids, 8).tokens, first)


def _mistral(window):
    config = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        vocab_size=320, max_position_embeddings=512,
                                        sliding_window=window)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def test_a_window_longer_than_the_cache_leaves_no_python_int_in_the_compiled_step(monkeypatch):
    """Mistral-7B-v0.1's window is 4096, longer than a bench's cache: its StaticSlidingWindowLayer
    would hand the compiled step its Python-int fill counter as a SymInt input, and CUDA graphs
    record one graph per value of an int input, one per decode position. A window that never
    slides inside the cache is a plain static layer."""
    model = _mistral(64)
    real_compile, inputs = torch.compile, []

    def record(gm, example_inputs):
        inputs.append([type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)])
        return gm.forward
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: real_compile(fn, backend=record, fullgraph=True))
    ids = random_tokens(1, 20, 320, "cpu", seed=1)
    engine = Engine(model)
    engine.allocate(1, 40)
    want = engine.generate(ids, 12, stop_on_eos=False).tokens
    engine.compile_decode()
    assert torch.equal(engine.generate(ids, 12, stop_on_eos=False).tokens, want)
    assert inputs and all(not ints for ints in inputs), inputs


def test_a_window_that_fills_inside_the_cache_is_compiled_within_compile_decode(monkeypatch):
    """A sliding layer takes another update path once its window is full: compile_decode must
    capture that step too, not leave it to the bench's first timed loop (outside compile_s)."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: real_compile(fn, backend="eager", fullgraph=True))
    model = _mistral(16)
    for prompt, new in ((24, 8), (12, 12)):  # past the window; crossing it mid-loop
        engine = Engine(model)
        engine.allocate(1, prompt + new)
        engine.compile_decode()  # as the bench calls it
        graphs = counters["stats"]["unique_graphs"]
        ids = random_tokens(1, prompt, 320, "cpu", seed=prompt)
        logits = engine.prefill(ids)
        engine.decode(logits, engine.next_positions(prompt), new + 1, stop_on_eos=False)
        assert counters["stats"]["unique_graphs"] == graphs
