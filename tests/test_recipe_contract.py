"""Recipes and CLI flags read one way: a recipe key given twice, a value that is not YAML,
numbers and N:M patterns spelled differently, settings that would change nothing: refused in
one line (exit 2, nothing written) or read alike."""
import json
import os

import pytest

from compress.cli import main
from compress.errors import UserError
from compress.recipe import load_recipe, load_yaml

CALIB = ["--calib-samples", "2", "--calib-seq-len", "16"]


def _refused(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert not os.path.exists(tmp_path / "X")


def test_option_value_that_is_not_yaml_is_one_line(tmp_path, capsys, monkeypatch):
    _refused(["quantize", "random:tiny", "--method", "rtn", "--option", "bits=[4", "--out", "X"],
             "--option bits=[4: the value is not valid YAML", tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("text", [
    "passes:\n  - {pass: rtn, bits: 4, bits: 8}\n",
    "passes:\n  - {pass: rtn, bits: 4}\npasses:\n  - {pass: rtn, bits: 8}\n",
    "calibration: {samples: 4, samples: 8}\npasses:\n  - {pass: gptq}\n",
])
def test_a_key_given_twice_in_a_recipe_is_refused(text, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError, match="given twice"):
        load_recipe(str(recipe))


def test_yaml_integers_are_yaml_1_2():
    assert load_yaml("010") == 10 and load_yaml("0o10") == 8 and load_yaml("0x10") == 16
    assert load_yaml("09") == 9 and load_yaml("-5") == -5 and load_yaml("1e-2") == 0.01


def test_option_and_flag_read_a_number_alike(tmp_path):
    for i, args in enumerate((["--group-size", "032"], ["--option", "group_size=032"])):
        out = tmp_path / str(i)
        assert main(["quantize", "random:tiny", "--method", "rtn", *args, "--out", str(out)]) == 0
        assert json.loads((out / "compress.json").read_text())["recipe"]["passes"][0][
            "group_size"] == 32


def test_nm_pattern_has_one_spelling(tmp_path):
    hashes = []
    for pattern in ("2:4", "02:04"):
        out = tmp_path / pattern.replace(":", "_")
        assert main(["prune", "random:tiny", "--method", "magnitude", "--pattern", pattern,
                     "--out", str(out)]) == 0
        recipe = json.loads((out / "compress.json").read_text())["recipe"]
        hashes.append((recipe["hash"], recipe["name"], recipe["passes"][0]["pattern"]))
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("name", ["null", "123", "true", "[a]"])
def test_recipe_name_must_be_a_string(name, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {name}\npasses:\n  - {{pass: rtn}}\n")
    with pytest.raises(UserError, match="name must be a string"):
        load_recipe(str(recipe))


def test_mlp_ratio_that_removes_nothing_is_refused(tmp_path, capsys, monkeypatch):
    _refused(["prune", "random:tiny", "--method", "mlp-channels", "--ratio", "0.001", *CALIB,
              "--out", "X"], "removes no MLP channel", tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("flag,message", [("--corpus", "--corpus is empty"),
                                          ("--calib-device", "unknown calibration device ''")])
def test_empty_corpus_or_calib_device_is_refused(flag, message, tmp_path, capsys, monkeypatch):
    _refused(["quantize", "random:tiny", "--method", "gptq", flag, "", *CALIB, "--out", "X"],
             message, tmp_path, capsys, monkeypatch)


def test_yaml_merge_keys_load_and_override(tmp_path):
    assert load_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n")["b"] == {"x": 1, "y": 3}
    assert load_yaml("a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: [*a, *b]\n")["c"] == {"x": 1, "y": 2}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - <<: &q {pass: rtn, bits: 4, group_size: 64}\n"
                      "    symmetric: true\n")
    assert load_recipe(str(recipe)).resolved()["passes"][0]["group_size"] == 64
    with pytest.raises(Exception, match="given twice"):    # still refused beside a merge
        load_yaml("a: &a {x: 1}\nb:\n  <<: *a\n  y: 1\n  y: 2\n")


def test_an_explicit_int_tag_that_is_no_integer_is_one_line(tmp_path, capsys, monkeypatch):
    _refused(["quantize", "random:tiny", "--method", "rtn", "--option", "bits=!!int 0b100",
              "--out", "X"], "'0b100' is not an integer", tmp_path, capsys, monkeypatch)
