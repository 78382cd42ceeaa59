"""The recipe loader is strict: unknown keys, passes, fields and bad types are one-line errors."""
import pytest

from compress.errors import UserError
from compress.recipe import load_recipe, recipe_from_dict


def _recipe(**overrides):
    data = {"name": "r", "passes": [{"pass": "rtn", "bits": 4, "group_size": 64}]}
    data.update(overrides)
    return data


def test_resolved_recipe_fills_defaults_and_hashes():
    resolved = recipe_from_dict(_recipe(), "r").resolved()
    assert resolved["passes"] == [{"pass": "rtn", "bits": 4, "group_size": 64, "symmetric": True}]
    assert resolved["calibration"] == {"samples": 64, "seq_len": 512, "batch_size": 8}
    assert len(resolved["hash"]) == 12
    assert recipe_from_dict(_recipe(name="other"), "x").resolved()["hash"] == resolved["hash"]
    on_gpu = recipe_from_dict(_recipe(calibration={"device": "cuda"}), "r").resolved()
    assert on_gpu["calibration"]["device"] == "cuda" and on_gpu["hash"] == resolved["hash"]
    # How the result is timed is not what was compressed either.
    for bench in ({"batches": "1"}, {"batches": "8"}):
        assert recipe_from_dict(_recipe(bench=bench), "r").resolved()["hash"] == resolved["hash"]


def test_group_size_default_depends_on_bits():
    assert recipe_from_dict(_recipe(passes=[{"pass": "rtn", "bits": 8}]), "r").passes[0][1].group_size == 0
    assert recipe_from_dict(_recipe(passes=[{"pass": "rtn", "bits": 4}]), "r").passes[0][1].group_size == 64


@pytest.mark.parametrize("data,message", [
    (_recipe(extra=1), r"unknown key\(s\) extra; allowed: bench, calibration, corpus"),
    (_recipe(passes=[{"pass": "nope"}]), r"unknown pass 'nope'; allowed: .*rtn"),
    (_recipe(passes=[{"pass": "rtn", "bitz": 4}]), r"unknown field\(s\) bitz .*allowed: bits"),
    (_recipe(passes=[{"pass": "rtn", "bits": 3}]), r"bits must be one of 4, 8"),
    (_recipe(passes=[{"pass": "rtn", "bits": "four"}]), r"rtn.bits must be of type int"),
    (_recipe(passes=[]), r"'passes' must be a non-empty list"),
    (_recipe(calibration={"samplez": 3}), r"calibration: unknown key\(s\) samplez"),
    (_recipe(calibration={"samples": 0}), r"calibration samples must be a positive integer"),
    (_recipe(calibration={"batch_size": -1}), r"calibration batch_size must be a positive"),
    (["not", "a", "mapping"], r"must be a mapping"),
    (_recipe(corpus=None), r"corpus must be a corpus name or file such as pydoc, got None"),
    (_recipe(corpus=5), r"corpus must be a corpus name or file such as pydoc, got 5"),
])
def test_bad_recipes_are_rejected(data, message):
    with pytest.raises(UserError, match=message):
        recipe_from_dict(data, "r")


def test_every_shipped_recipe_loads():
    import glob

    paths = glob.glob("recipes/*.yaml")
    assert paths
    for path in paths:
        assert load_recipe(path).passes


def test_missing_and_invalid_recipe_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))


def test_the_hash_names_what_the_model_is_not_how_it_is_measured():
    def digest(**overrides):
        return recipe_from_dict(_recipe(**overrides), "r").resolved()["hash"]

    plain = digest()
    assert digest(evaluation={"windows": 3, "enabled": False}) == plain
    # RTN reads no calibration data: neither the corpus nor the samples change its weights.
    assert digest(corpus="random", calibration={"samples": 4}) == plain
    gptq = [{"pass": "gptq", "bits": 4, "group_size": 64}]
    assert digest(passes=gptq) != digest(passes=gptq, corpus="random") != \
        digest(passes=gptq, calibration={"samples": 4})


def test_yaml_numbers_read_as_yaml_1_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - {pass: sparsegpt, damp: 1e-2, pattern: 2:4}\n")
    config = load_recipe(str(recipe)).passes[0][1]
    assert config.damp == 0.01 and config.pattern == "2:4"


# One pass of each order-relevant sort, with options that run on the tiny model (widths 64 and
# 139-149 via mlp-channels are not all multiples of 64: per-channel int8, nf4 blocksize 32).
ORDER_PASSES = {"rtn": {"bits": 8, "group_size": 0}, "bnb-nf4": {"blocksize": 32},
                "magnitude": {"sparsity": 0.5}, "mlp-channels": {"ratio": 0.25},
                "heads": {"ratio": 0.5}, "layers": {"drop": 1},
                "lm-head": {"bits": 8, "group_size": 0}}


def test_pass_order_checked_up_front_agrees_with_the_passes_themselves(tiny_model, tokens):
    """`check_order` refuses exactly the two-pass chains whose second pass would fail on the model
    (after the first pass ran, and its calibration with it)."""
    import copy

    from compress.calibration import CalibrationData
    from compress.passes import pass_table
    from compress.recipe import Recipe, apply_recipe

    table = pass_table()
    for first in ORDER_PASSES:
        for second in ORDER_PASSES:
            if first == second in ("heads", "layers"):
                continue   # the tiny model's 2 KV groups and 2 layers do not survive halving twice
            entries = [{"pass": name, **ORDER_PASSES[name]} for name in (first, second)]
            try:
                recipe_from_dict({"passes": entries}, "r")
                refused = None
            except UserError as exc:
                refused = str(exc)
            chain = Recipe("r", passes=[(e["pass"], build(table, e)) for e in entries])
            try:
                apply_recipe(copy.deepcopy(tiny_model), chain, calib=CalibrationData(tokens[:2, :32]))
                failed = None
            except UserError as exc:
                failed = str(exc)
            assert (refused is None) == (failed is None), (first, second, refused, failed)


def build(table, entry):
    from compress.passes import build_config

    fields = {k: v for k, v in entry.items() if k != "pass"}
    return build_config(table[entry["pass"]], fields)
