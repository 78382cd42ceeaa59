"""Bad files and values given to the CLI end as one line and exit code 2, before any work, and
never cost the user a file: unreadable corpora, corrupt checkpoints, unwritable outputs,
recipe names that are not file names, an --out that holds an input."""
import json
import os

import pytest
import transformers

from compress.cli import main
from compress.sources import byte_tokenizer

EVAL = ["--windows", "2", "--seq-len", "64"]
REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reports", "smollm2-135m-rtn")


def _files(root):
    (root / "latin.txt").write_bytes(b"caf\xe9 " * 50)
    (root / "bad.jsonl").write_text("{not json\n")
    (root / "num.jsonl").write_text('{"text": 5}\n')
    (root / "bad.gguf").write_text("not a gguf file")
    (root / "afile").write_text("x")
    (root / "ck").mkdir()
    (root / "ck" / "compress.json").write_text("{}")
    (root / "ck" / "config.json").write_text("{}")
    (root / "ck2").mkdir()
    (root / "ck2" / "compress.json").write_text('{"dtype": "foo"}')
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (root / "data").mkdir()
    (root / "data" / "corp.txt").write_text("some text " * 50)
    for name, recipe in {"escape": "name: ../escaped\npasses:\n  - {pass: rtn}\n",
                         "reserved": "name: baseline\npasses:\n  - {pass: rtn}\n",
                         "listpass": "passes:\n  - {pass: [rtn]}\n",
                         "intmodel": "model: 123\npasses:\n  - {pass: rtn}\n",
                         "ckmodel": "model: ck\npasses:\n  - {pass: rtn}\n",
                         "corpfile": "corpus: data/corp.txt\npasses:\n  - {pass: rtn}\n",
                         "rtn": "passes:\n  - {pass: rtn}\n",
                         "noeval": "evaluation: {enabled: false}\npasses:\n  - {pass: rtn}\n"
                         }.items():
        (root / f"{name}.yaml").write_text(recipe)


@pytest.mark.parametrize("argv,message", [
    (["eval", "random:tiny", "--batch-size", "0"], "evaluation batch_size must be an integer >= 1"),
    (["eval", "random:tiny", "--seq-len", "1"], "evaluation seq_len must be an integer >= 2"),
    (["quantize", "random:tiny", "--method", "rtn", "--seq-len", "0", "--eval", "--out", "X"],
     "evaluation seq_len must be an integer >= 2, got 0"),
    (["quantize", "random:tiny", "--method", "rtn", "--out", "afile/X"], "afile is not a folder"),
    (["eval", "random:tiny", "--out", "afile/r.json"], "afile is not a folder"),
    (["eval", "random:tiny", "--corpus", "latin.txt"],
     "'latin.txt' is not valid txt: 'utf-8' codec can't decode"),
    (["eval", "random:tiny", "--corpus", ""], "--corpus is empty"),
    (["eval", "random:tiny", "--corpus", "bad.jsonl"], "'bad.jsonl' is not valid jsonl"),
    (["eval", "random:tiny", "--corpus", "num.jsonl"], "every 'text' value must be a string"),
    (["eval", "ck"], "checkpoint ck is incomplete or corrupt"),
    (["eval", "ck2"], "checkpoint ck2: compress.json has dtype 'foo'; allowed: float32"),
    (["run", "binary.yaml", "--model", "random:tiny", "--out", "X"],
     "recipe binary.yaml is not valid YAML: 'utf-8' codec can't decode"),
    (["report", "ck"], "checkpoint 'ck' has no results.json (written without --eval)"),
    (["eval", "bad.gguf"], "could not read GGUF file bad.gguf"),
    (["sweep", "escape.yaml", "--model", "random:tiny", "--out", "X"],
     "recipe name '../escaped' must be letters"),
    (["sweep", "reserved.yaml", "--model", "random:tiny", "--out", "X"], "not baseline or failures"),
    (["run", "listpass.yaml", "--model", "random:tiny", "--out", "X"], "unknown pass ['rtn']"),
    (["run", "intmodel.yaml", "--out", "X"], "model must be a model source string"),
    (["eval", "random:tiny", "--out", "afile"], "output afile exists; pass --overwrite"),
    (["eval", "random:tiny", "--out", "ck"], "output ck is a folder; give a file name"),
    (["quantize", "random:tiny", "--method", "rtn", "--out", ""], "--out is empty"),
    (["quantize", "random:tiny", "--method", "rtn", "--eval", "--windows", "1", "--seq-len",
      "4096", "--out", "X"], "windows of 4096 tokens exceed the model's 2048 positions"),
    (["run", "listpass.yaml", "--model", "random:tiny", "--out", "listpass.yaml", "--overwrite"],
     "--out listpass.yaml is the input listpass.yaml"),
    (["eval", "ck", "--out", "ck/config.json", "--overwrite"],
     "--out ck/config.json lies inside the source model ck"),
    # Inside the source model is refused whether or not the output exists or --overwrite is given.
    (["quantize", "ck", "--method", "rtn", "--out", "ck/sub"], "--out ck/sub lies inside the source"),
    (["eval", "ck", "--out", "ck/r.json"], "--out ck/r.json lies inside the source model ck"),
    # What only the recipe names is spared too.
    (["run", "ckmodel.yaml", "--out", "ck", "--overwrite"], "--out ck is the input ck"),
    (["run", "ckmodel.yaml", "--out", "ck/x"], "--out ck/x lies inside the source model ck"),
    (["run", "corpfile.yaml", "--model", "random:tiny", "--out", "data", "--overwrite"],
     "--out data holds the input data/corp.txt"),
    (["sweep", "corpfile.yaml", "--model", "random:tiny", "--out", "data", "--overwrite"],
     "--out data holds the input data/corp.txt"),
    (["report", "afile", "--out", "r.json"], "a report is written as FILE.md, FILE.html or a folder"),
    (["report", REPORT, "--decode-batch", "8"], "--decode-batch has no effect without"),
    # --overwrite replaces an output folder, never a file; nor does it mean anything without --out.
    (["quantize", "random:tiny", "--method", "rtn", "--out", "afile", "--overwrite"],
     "output afile is a file, not a folder"),
    (["eval", "random:tiny", "--overwrite"], "--overwrite has no effect without --out"),
    (["bench", "random:tiny", "--overwrite"], "--overwrite has no effect without --out"),
    # Flags that would be accepted and ignored, in run and sweep as in quantize.
    (["run", "rtn.yaml", "--model", "random:tiny", "--calib-samples", "8", "--out", "X"],
     "--calib-samples has no effect: rtn does not calibrate"),
    (["run", "rtn.yaml", "--model", "random:tiny", "--no-eval", "--windows", "3", "--out", "X"],
     "--windows has no effect with --no-eval"),
    (["run", "rtn.yaml", "--model", "random:tiny", "--no-eval", "--corpus", "pydoc", "--out", "X"],
     "--corpus has no effect with --no-eval (rtn does not calibrate)"),
    (["run", "noeval.yaml", "--model", "random:tiny", "--seq-len", "64", "--out", "X"],
     "--seq-len has no effect when the recipe's evaluation.enabled is false"),
    (["sweep", "rtn.yaml", "--model", "random:tiny", "--calib-dtype", "bfloat16", "--out", "X"],
     "--calib-dtype has no effect: rtn does not calibrate"),
    (["sweep", "noeval.yaml", "--model", "random:tiny", "--out", "X"],
     "recipe noeval sets evaluation.enabled: false, which compress sweep does not read"),
])
def test_bad_files_and_values_are_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert _listing(tmp_path) == before        # nothing written, replaced or left over


def _listing(root):
    return sorted((name, os.path.isdir(root / name)) for name in os.listdir(root))


def test_overwrite_never_deletes_an_input_or_the_current_folder(tmp_path, capsys, monkeypatch):
    nest = tmp_path / "nest"
    src = nest / "src"
    assert main(["quantize", "random:tiny", "--method", "rtn", "--bits", "8",
                 "--out", str(src)]) == 0
    cases = [
        (["prune", str(src), "--method", "magnitude", "--out", str(nest)], "holds the input"),
        (["quantize", str(src), "--method", "rtn", "--out", str(src)], "is the input"),
        (["quantize", "random:tiny", "--method", "rtn", "--out", "."], "is the current folder"),
    ]
    monkeypatch.chdir(nest)
    for argv, message in cases:
        capsys.readouterr()
        assert main([*argv, "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert (src / "compress.json").exists() and (src / "model.safetensors").exists()


def test_the_recipe_evaluation_batch_size_is_kept_without_the_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - {pass: rtn, bits: 8}\nevaluation: {batch_size: 2}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--model", "random:tiny", "--out", str(out), *EVAL]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["evaluation"]["batch_size"] == 2


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    from compress.commands import eval as eval_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_command, "run", interrupted)
    assert main(["eval", "random:tiny"]) == 130
    assert capsys.readouterr().err == ("compress eval: interrupted; its unfinished outputs were "
                                       "removed\n")


def test_a_checkpoint_naming_a_module_its_model_lacks_is_one_line(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["quantize", "random:tiny", "--method", "rtn", "--bits", "8", "--out",
                 str(ck)]) == 0
    meta = json.loads((ck / "compress.json").read_text())
    name = next(iter(meta["modules"]))
    meta["modules"]["model.nope.q"] = meta["modules"].pop(name)
    (ck / "compress.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["eval", str(ck), *EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert f"checkpoint {ck} is incomplete or corrupt" in err and "\n" not in err


def _phi3(path):
    """A tiny Phi3 (q/k/v packed in one linear, which no adapter knows) with a tokenizer."""
    config = transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=320, max_position_embeddings=256,
                                     pad_token_id=257)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def test_an_unsupported_architecture_is_refused_before_any_evaluation(tmp_path, capsys):
    """Phi3 packs q/k/v into one linear, which no adapter knows: `eval` must say so at load,
    like quantize and prune, not after computing a whole perplexity."""
    _phi3(tmp_path / "phi3")
    assert main(["eval", str(tmp_path / "phi3"), "--corpus", "random", *EVAL]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'phi3'" in err and "perplexity" not in err


def test_bench_refuses_an_unsupported_architecture_before_measuring(tmp_path, capsys):
    _phi3(tmp_path / "phi3")
    assert main(["bench", str(tmp_path / "phi3"), "--batch", "1", "--prompt", "8", "--new", "2",
                 "--prefill", "1x8", "--warmup", "0", "--repeats", "1"]) == 2
    captured = capsys.readouterr()
    assert "unsupported architecture 'phi3'" in captured.err
    assert "peer hf" not in captured.out and "ceilings" not in captured.out
