"""The unstructured and N:M passes on a tiny model: exact sparsity reached and reported, valid
N:M groups, Wanda's masks from the layer's real (already-pruned) inputs, SparseGPT's lower
reconstruction error, and OWL profiles that keep the mean sparsity."""
from __future__ import annotations

import copy

import pytest
import torch

from compress.adapters import adapter_for, decoder_linears
from compress.errors import UserError
from compress.passes import build_config, pass_table
from compress.prune import masks
from compress.prune.common import input_groups
from compress.prune.sparsegpt import accumulate_hessian, reconstruction_error

from apply_pass import apply_pass


def _inputs_of(model, rel_name: str, layer_index: int, tokens, batch: int = 2) -> torch.Tensor:
    """The 2-D input rows reaching one linear of one decoder layer when the model runs `tokens`
    in batches of `batch` (as the pass's calibration does)."""
    a = adapter_for(model)
    linear = a.layers(model)[layer_index].get_submodule(rel_name)
    seen = []
    handle = linear.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for part in tokens.split(batch):
                model(part, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_matrix_reaches_the_exact_sparsity_and_it_is_reported(tiny_model, tokens, method):
    sparsity = 0.37    # round(0.37 * numel) is not a multiple of the row count: exactness shows
    model = apply_pass(tiny_model, method, tokens, sparsity=sparsity)
    for name, linear in decoder_linears(model):
        zeros = int((linear.weight == 0).sum())
        assert zeros == round(sparsity * linear.weight.numel()), name
    report = model.compress_report["sparsity"]
    total = sum(linear.weight.numel() for _, linear in decoder_linears(model))
    assert report["numel"] == total
    assert report["zeros"] == sum(round(sparsity * l.weight.numel())
                                  for _, l in decoder_linears(model))
    assert report["overall"] == pytest.approx(sparsity, abs=1e-4)
    assert set(report["per_layer"]) == {"0", "1"}
    assert len(report["per_matrix"]) == 14
    assert report["method"] == method and report["target_per_layer"] == [sparsity] * 2


@pytest.mark.parametrize("method,n,m", [("magnitude", 2, 4), ("wanda", 2, 4), ("wanda", 4, 8),
                                        ("sparsegpt", 2, 4), ("sparsegpt", 4, 8)])
def test_every_nm_group_of_every_matrix_is_valid(tiny_model, tokens, method, n, m):
    model = apply_pass(tiny_model, method, tokens, pattern=f"{n}:{m}")
    for name, linear in decoder_linears(model):
        assert masks.is_nm(linear.weight != 0, n, m), name
    assert model.compress_report["sparsity"]["overall"] == pytest.approx(1 - n / m)


def test_wanda_masks_come_from_the_inputs_each_layer_really_sees(tiny, tokens):
    """Layer 1 is pruned on the outputs of the already-pruned layer 0 (sequential calibration),
    with |W| * ||X_j|| compared within each output row."""
    dense = tiny.model
    a = adapter_for(dense)
    q = f"{a.attention}.{a.q}"
    x0 = _inputs_of(dense, q, 0, tokens)
    w0 = a.layers(dense)[0].get_submodule(q).weight.detach().clone()
    w1 = a.layers(dense)[1].get_submodule(q).weight.detach().clone()
    model = apply_pass(dense, "wanda", tokens, sparsity=0.5)
    x1 = _inputs_of(model, q, 1, tokens)          # layer 0 pruned: what layer 1 saw
    for w, x, index in ((w0, x0, 0), (w1, x1, 1)):
        expected = masks.unstructured_mask(masks.wanda_scores(w, x.pow(2).sum(0)), 0.5, "row")
        got = a.layers(model)[index].get_submodule(q).weight != 0
        assert torch.equal(got, expected), index
    # Not what magnitude alone would choose: the input norms change the mask.
    assert not torch.equal(got, masks.unstructured_mask(masks.magnitude_scores(w1), 0.5, "row"))


@pytest.mark.parametrize("pattern", ["unstructured", "4:8"])
def test_sequential_wanda_chooses_every_mask_on_the_inputs_of_the_pruned_model(tiny_model, tokens,
                                                                             pattern):
    """sequential: each group is pruned when the forward reaches it, so o_proj's mask comes from
    the outputs of the pruned q/k/v, down_proj's from the pruned gate/up, and so on: every mask
    is Wanda's on exactly the inputs that linear sees in the final pruned model."""
    dense = {name: linear.weight.detach().clone() for name, linear in decoder_linears(tiny_model)}
    model = apply_pass(tiny_model, "wanda", tokens, pattern=pattern, sequential=True)
    a = adapter_for(model)
    prefix = a.layers_path
    for index, layer in enumerate(a.layers(model)):
        for name in a.linear_names():
            x = _inputs_of(model, name, index, tokens, batch=len(tokens))
            w = dense[f"{prefix}.{index}.{name}"]
            expected = masks.select_mask(masks.wanda_scores(w, x.pow(2).sum(0)), 0.5, pattern)
            assert torch.equal(layer.get_submodule(name).weight != 0, expected), (index, name)
    assert model.compress_report["sparsity"]["overall"] == 0.5


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_layer_outputs_better_than_wanda(tiny, tokens, pattern):
    """Same sparsity, lower output error on the calibration inputs; by far where inputs are
    correlated (o_proj reads attention outputs), where OBS updates have something to exploit."""
    a = adapter_for(tiny.model)
    names = [f"{a.attention}.{a.q}", f"{a.attention}.{a.o}", f"{a.mlp}.{a.down}"]
    x = {n: _inputs_of(tiny.model, n, 0, tokens) for n in names}
    dense = {n: a.layers(tiny.model)[0].get_submodule(n).weight.detach().clone() for n in names}
    wanda = apply_pass(copy.deepcopy(tiny.model), "wanda", tokens, pattern=pattern)
    sgpt = apply_pass(tiny.model, "sparsegpt", tokens, pattern=pattern)
    errors = {}
    for n in names:
        h, _ = accumulate_hessian(None, 0, x[n])
        errors[n] = [reconstruction_error(dense[n], a.layers(m)[0].get_submodule(n).weight.detach(),
                                          h) for m in (wanda, sgpt)]
        assert errors[n][1] < errors[n][0], n
    assert errors[names[1]][1] < 0.5 * errors[names[1]][0]


def test_owl_profile_reaches_its_per_layer_targets_and_the_mean(tiny_model, tokens):
    # A strong outlier column in layer 1's MLP input makes layer 1 the outlier-heavy one.
    a = adapter_for(tiny_model)
    a.layers(tiny_model)[1].get_submodule(f"{a.mlp}.{a.gate}").weight.data[:, 3] *= 40
    model = apply_pass(tiny_model, "wanda", tokens, sparsity=0.5, profile="owl", owl_lambda=0.05)
    report = model.compress_report["sparsity"]
    targets = report["target_per_layer"]
    assert targets[1] < 0.5 < targets[0]
    assert sum(targets) / 2 == pytest.approx(0.5)
    for layer, target in zip(("0", "1"), targets):
        assert report["per_layer"][layer] == pytest.approx(target, abs=1e-3)
    assert report["overall"] == pytest.approx(0.5, abs=1e-3)


def test_pruning_needs_float_linears_first(tiny_model, tokens):
    apply_pass(tiny_model, "rtn", bits=8)
    with pytest.raises(UserError, match="put pruning passes before quantization"):
        apply_pass(tiny_model, "wanda", tokens)


@pytest.mark.parametrize("fields,message", [
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"pattern": "4:2"}, "pattern must be unstructured or N:M"),
    ({"pattern": "2:4", "sparsity": 0.3}, "pattern 2:4 implies sparsity 0.5"),
    ({"pattern": "2:4", "profile": "owl"}, "profile 'owl' needs pattern unstructured"),
    ({"profile": "layerwise"}, "profile must be one of uniform, owl"),
    ({"scope": "matrix"}, "scope must be one of row, layer"),
])
def test_config_errors_name_what_is_allowed(fields, message):
    with pytest.raises(UserError, match=message):
        build_config(pass_table()["wanda"], fields)


@pytest.mark.parametrize("name,fields,unused", [
    ("magnitude", {"pattern": "2:4", "scope": "row"}, "scope"),
    ("wanda", {"pattern": "2:4", "scope": "layer"}, "scope"),
    ("wanda", {"pattern": "4:8", "scope": "row-mass"}, "scope"),
    ("wanda", {"sparsity": 0.5, "owl_lambda": 0.2}, "owl_lambda"),
    ("sparsegpt", {"sparsity": 0.5, "owl_threshold": 9.0}, "owl_threshold")])
def test_options_other_settings_leave_unused_are_refused(name, fields, unused):
    """N:M ignores scope and profile uniform ignores the OWL options: accepted, they would be
    recorded in the recipe (and its hash) while changing nothing."""
    with pytest.raises(UserError, match=f"{unused} .* has no effect"):
        build_config(pass_table()[name], fields)
    build_config(pass_table()[name], {k: v for k, v in fields.items() if k != unused})


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_owl_per_layer_targets_are_what_each_layer_reaches(tiny_model, tokens, method):
    """Catches: magnitude / sparsegpt pruning every layer at config.sparsity instead of its OWL
    target (the report's target_per_layer would then differ from what the weights have)."""
    a = adapter_for(tiny_model)
    a.layers(tiny_model)[1].get_submodule(f"{a.mlp}.{a.gate}").weight.data[:, 3] *= 40
    model = apply_pass(tiny_model, method, tokens, sparsity=0.5, profile="owl", owl_lambda=0.05)
    report = model.compress_report["sparsity"]
    targets = report["target_per_layer"]
    assert abs(targets[0] - targets[1]) > 0.01
    for layer, target in zip(("0", "1"), targets):
        assert report["per_layer"][layer] == pytest.approx(target, abs=1e-3)


def test_owl_threshold_decides_the_outlier_ratios(tiny_model):
    """Catches: the measured outlier ratio ignoring owl_threshold (always the default 5)."""
    a = adapter_for(tiny_model)
    layers = a.layers(tiny_model)
    threshold = 2.5

    def ratios(at):
        return [masks.outlier_ratio([masks.magnitude_scores(layer.get_submodule(n).weight)
                                     for g in input_groups(a) for n in g], at)
                for layer in layers]
    expected = masks.owl_profile(ratios(threshold), 0.5, 0.05)
    assert expected != masks.owl_profile(ratios(5.0), 0.5, 0.05)   # the threshold matters here
    model = apply_pass(tiny_model, "magnitude", sparsity=0.5, profile="owl", owl_lambda=0.05,
                       owl_threshold=threshold)
    assert model.compress_report["sparsity"]["target_per_layer"] == pytest.approx(expected,
                                                                                 abs=1e-6)


@pytest.mark.parametrize("scope", ["layer", "row-mass"])
def test_wanda_scope_is_the_mask_scope(tiny, tokens, scope):
    """Catches: wanda always comparing within rows whatever `scope` says."""
    dense = tiny.model
    a = adapter_for(dense)
    q = f"{a.attention}.{a.q}"
    x0 = _inputs_of(dense, q, 0, tokens)
    w0 = a.layers(dense)[0].get_submodule(q).weight.detach().clone()
    model = apply_pass(dense, "wanda", tokens, sparsity=0.5, scope=scope)
    scores = masks.wanda_scores(w0, x0.pow(2).sum(0))
    expected = masks.unstructured_mask(scores, 0.5, scope)
    got = a.layers(model)[0].get_submodule(q).weight != 0
    assert torch.equal(got, expected)
    assert not torch.equal(got, masks.unstructured_mask(scores, 0.5, "row"))
