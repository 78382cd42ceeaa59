"""Save and reload compressed checkpoints exactly; the source model is never modified."""
import json
import os

import pytest
import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.errors import UserError
from compress.passes import pass_table
from compress.quant.rtn import RTNConfig, rtn

from reload_exactly import reload_exactly


@pytest.mark.parametrize("config", [RTNConfig(bits=8), RTNConfig(bits=4, group_size=32),
                                    RTNConfig(bits=4, group_size=64, symmetric=False)])
def test_reload_gives_bit_identical_logits(tiny, tokens, tmp_path, config):
    reloaded, _ = reload_exactly(rtn(tiny.model, config), tokens, tmp_path / "ckpt")
    # Tied embeddings stay tied after reload.
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_quantized_checkpoint_is_smaller_on_disk(tiny, tmp_path):
    save_checkpoint(tiny.model, tiny.tokenizer, str(tmp_path / "float"), None, {})
    model = rtn(tiny.model, RTNConfig(bits=4, group_size=32))
    save_checkpoint(model, tiny.tokenizer, str(tmp_path / "int4"), None, {})
    size = lambda d: os.path.getsize(tmp_path / d / "model.safetensors")  # noqa: E731
    linear_float = sum(p.numel() * 4 for n, p in tiny.model.named_parameters() if "proj" in n)
    assert size("int4") < size("float") - linear_float * 0.7


def test_existing_output_needs_overwrite_and_failure_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(tiny.model, tiny.tokenizer, str(out), None, {})
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        save_checkpoint(tiny.model, tiny.tokenizer, str(out), None, {})
    with pytest.raises(RuntimeError):
        # A model whose state dict cannot be read fails mid-write: no temporary folder remains
        # and the old checkpoint is untouched.
        class Broken(torch.nn.Module):
            config = tiny.model.config

            def state_dict(self):
                raise RuntimeError("boom")
        save_checkpoint(Broken(), None, str(out), None, {}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert load_checkpoint(str(out)).model is not None


def test_rtn_pass_is_registered():
    assert pass_table()["rtn"].config_cls is RTNConfig


def test_reload_in_another_dtype_casts_the_float_parameters(tiny, tmp_path):
    save_checkpoint(tiny.model, tiny.tokenizer, str(tmp_path / "ck"), {"name": "t"},
                    tiny.provenance)
    reloaded = load_checkpoint(str(tmp_path / "ck"), torch.bfloat16).model
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_parameter_count_is_the_same_before_and_after_quantizing(tiny):
    """Quantized layers count the weights they encode, not their stored bytes or buffers."""
    from compress.evaluate.memory import parameter_count

    before = parameter_count(tiny.model)
    assert parameter_count(rtn(tiny.model, RTNConfig(bits=4, group_size=32))) == before


def test_eval_refuses_a_checkpoint_that_lost_its_tokenizer_and_bench_times_it(tmp_path, capsys):
    """A checkpoint of a real (not random) source without its tokenizer files would be scored on
    byte ids its embedding never learned: a wrong perplexity without a word. One line instead."""
    from compress.cli import main
    from compress.sources import load_model

    loaded = load_model("random:tiny")
    loaded.model.save_pretrained(tmp_path / "hf")
    loaded.tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), "--method", "rtn", "--out",
                 str(tmp_path / "ck")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(tmp_path / "ck" / name)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ck"), "--windows", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no tokenizer" in err and "\n" not in err
    # Timing reads token ids only: the bench still runs it.
    assert main(["bench", str(tmp_path / "ck"), "--batch", "1", "--prompt", "8", "--new", "2",
                 "--prefill", "1x16", "--warmup", "0", "--repeats", "1", "--peers", "none"]) == 0


def test_a_bfloat16_checkpoint_records_and_reloads_in_bfloat16(tokens, tmp_path):
    from compress.sources import load_model

    tiny = load_model("random:tiny", dtype=torch.bfloat16)  # not .to(): that casts RoPE's inv_freq
    model = rtn(tiny.model, RTNConfig(bits=4, group_size=32))
    reloaded, meta = reload_exactly(model, tokens, tmp_path / "ck")
    assert meta["dtype"] == "bfloat16"
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_compress_json_keeps_recipe_and_provenance(tiny, tmp_path, monkeypatch):
    recipe = {"name": "t", "passes": [{"pass": "rtn", "bits": 4, "group_size": 32}]}
    model = rtn(tiny.model, RTNConfig(bits=4, group_size=32))
    monkeypatch.chdir(tmp_path)
    save_checkpoint(model, tiny.tokenizer, "ck", recipe, tiny.provenance)
    meta = json.loads((tmp_path / "ck" / "compress.json").read_text())
    assert meta["recipe"] == recipe
    assert meta["provenance"] == json.loads(json.dumps(tiny.provenance))
    assert meta["modules"]["model.layers.0.mlp.down_proj"]["format"] == "int4"
    loaded = load_checkpoint("ck")
    assert loaded.provenance["recipe"] == recipe
    assert loaded.provenance["checkpoint"] == str(tmp_path / "ck")


def test_overwrite_leaves_no_old_copy_beside_the_output(tiny, tmp_path):
    out = tmp_path / "ck"
    save_checkpoint(tiny.model, tiny.tokenizer, str(out), None, {})
    save_checkpoint(tiny.model, tiny.tokenizer, str(out), None, {}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_biased_reshaped_linear_reloads_exactly(tiny, tokens, tmp_path):
    from torch import nn

    mlp = tiny.model.model.layers[0].mlp
    width = mlp.down_proj.in_features // 2   # what channel pruning with per-layer widths leaves
    torch.manual_seed(0)
    mlp.gate_proj = nn.Linear(mlp.gate_proj.in_features, width, bias=True)
    mlp.up_proj = nn.Linear(mlp.up_proj.in_features, width, bias=True)
    mlp.down_proj = nn.Linear(width, mlp.down_proj.out_features, bias=True)
    reloaded, _ = reload_exactly(tiny.model, tokens, tmp_path / "ck")
    assert reloaded.model.layers[0].mlp.down_proj.bias is not None
