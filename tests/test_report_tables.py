"""Tables, deltas, the Pareto front, verdicts and `--speed-from` joining: each figure a report
shows, checked against what it is computed from."""
import pytest

from compress.errors import UserError
from compress.reports import markdown_report
from compress.reports.frame import pareto_front, results_frame
from compress.reports.speed_source import attach_speed
from compress.reports.verdict import verdict
from test_report import SPEED_PROTOCOL, result


def test_pareto_front_with_ties():
    # Same memory, worse perplexity: dominated. Two identical points: neither beats the other.
    assert pareto_front([50, 50, 100], [11, 12, 10]) == [0, 2]
    assert pareto_front([50, 50], [11, 11]) == [0, 1]


def test_linear_ratio_is_its_own_column():
    new = result("int4", total=250e6)
    new["metrics"]["weight_bytes"]["linear"] = 350e6     # baseline linear 700 MB: 2x, weights 4x
    frame = results_frame([result(), new])
    assert frame.iloc[1]["weight_ratio"] == pytest.approx(4.0)
    assert frame.iloc[1]["linear_ratio"] == pytest.approx(2.0)
    assert "| 250.0 | 4.00 | 350.0 | 2.00 |" in markdown_report([result(), new])


def test_task_delta_is_new_minus_baseline():
    frame = results_frame([result(tasks=0.5), result("int4", tasks=0.6)])
    assert frame.iloc[1]["task:t:acc_delta"] == pytest.approx(0.1)
    assert "0.600 ± 0.020 (+0.100)" in markdown_report([result(tasks=0.5),
                                                        result("int4", tasks=0.6)])


def test_speed_table_shows_the_roofline_percentage():
    text = markdown_report([result(ms=10), result("int4", ms=5)])
    assert "| 5.000 | 200.0 | 2.00 | 50.0 |" in text


def test_verdict_words_and_noise_bounds():
    assert verdict([("decode b1", 1.5), ("decode b8", 1.0)], 4.0)[3] == "faster or the same"
    assert verdict([("decode b1", 1.0)], 1.03)[3] == "no change"   # 3% smaller: within noise
    assert verdict([("decode b1", 1.05)], 1.0)[0] == "-"            # 5% exactly: the same


@pytest.mark.parametrize("key,value", [("dtype", "bfloat16"), ("eval_seq_len", 128)])
def test_results_on_another_dtype_or_window_length_are_refused(key, value):
    other = result("x")
    other["protocol"][key] = value
    with pytest.raises(UserError, match="different protocols"):
        results_frame([result(), other])


def test_two_model_files_with_one_name_are_refused():
    old, new = result(), result("x")
    old["model"]["provenance"] = {"source": "m.gguf", "sha256": "aa"}
    new["model"]["provenance"] = {"source": "m.gguf", "sha256": "bb"}
    with pytest.raises(UserError, match="different models"):
        results_frame([old, new])


def _donors(**changes):
    donors = [("gpu/baseline.json", result(ms=10)), ("gpu/int4.json", result("int4", ms=5))]
    for _, d in donors:
        d["model"]["source"] = "random:tiny-gpu"
    return donors


def test_speed_from_matches_passes_not_only_names():

    other = result("int4")
    other["recipe"]["passes"] = [{"pass": "rtn", "bits": 8}]
    assert attach_speed([result(), other], _donors()) == ["int4"]
    assert "speed" not in other["metrics"]


def test_speed_from_drops_a_results_own_speed_when_unmatched():

    own = result("int8", ms=7)
    assert attach_speed([result(), own], _donors()) == ["int8"]
    assert "speed" not in own["metrics"] and "speed" not in own["protocol"]


def test_speed_from_refuses_two_machines_and_a_missing_baseline():

    donors = _donors()
    donors[1][1]["metrics"]["speed"]["gpu"] = "NVIDIA H200"
    with pytest.raises(UserError, match="different machines"):
        attach_speed([result(), result("int4")], donors)
    with pytest.raises(UserError, match="no baseline"):
        attach_speed([result(), result("int4")], _donors()[1:])


def test_speed_from_carries_the_speed_protocol():

    quality = [result(), result("int4")]
    assert attach_speed(quality, _donors()) == []
    assert all(q["protocol"]["speed"] == SPEED_PROTOCOL for q in quality)
    assert "decode prompt 512, 128 new tokens" in markdown_report(quality)


def test_the_committed_smollm2_sweep_joins_a_speed_sweep_of_its_recipes_today():
    """The GPU run owed to reports/smollm2-135m-sweep times the same recipe files on
    random:smollm2-135m, then `--speed-from` joins by recipe key and model shape: a pass field
    added since the sweep (its resolved passes would differ) or a random shape off by a parameter
    would leave that GPU run's figures unjoinable."""
    import json
    from pathlib import Path

    from compress.evaluate.memory import parameter_count
    from compress.recipe import load_recipe
    from compress.reports.speed_source import recipe_key
    from compress.sources import load_random

    root = Path(__file__).resolve().parent.parent
    sweep = [json.loads(p.read_text())
             for p in sorted((root / "reports/smollm2-135m-sweep").glob("*.json"))]
    recipes = [r for r in sweep if r.get("recipe")]
    assert len(recipes) == 7
    for committed in recipes:
        today = load_recipe(str(root / "recipes" / f"{committed['recipe']['name']}.yaml"))
        assert recipe_key({"recipe": today.resolved()}) == recipe_key(committed)
    (baseline,) = [r for r in sweep if not r.get("recipe")]
    model = load_random("smollm2-135m").model
    assert model.config.model_type == baseline["model"]["architecture"]
    assert parameter_count(model) == baseline["model"]["parameters"]
