"""Loading refuses what would be a silently wrong model; a terminated run leaves no temp folder."""
import json
import os
import signal
import stat

import pytest
from safetensors.torch import load_file, save_file

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.cli import main
from compress.errors import UserError
from compress.quant.rtn import RTNConfig, rtn
from compress.sources import load_model


def _int4_checkpoint(tiny, path):
    model = rtn(tiny.model, RTNConfig(bits=4, group_size=16))
    save_checkpoint(model, tiny.tokenizer, str(path), {"name": "t"}, tiny.provenance)
    return path


def test_a_checkpoint_without_compress_json_is_refused_not_random(tiny, tmp_path):
    # Loaded as a plain HF folder, its quantized linears would be initialized at random.
    folder = _int4_checkpoint(tiny, tmp_path / "ckpt")
    os.remove(folder / "compress.json")
    with pytest.raises(UserError, match="compress.json missing"):
        load_model(str(folder))


def test_a_spec_that_does_not_match_the_tensors_is_one_line_exit_2(tiny, tmp_path, capsys):
    folder = _int4_checkpoint(tiny, tmp_path / "ckpt")
    meta = json.loads((folder / "compress.json").read_text())
    meta["modules"]["model.layers.0.self_attn.q_proj"]["group_size"] = 32
    (folder / "compress.json").write_text(json.dumps(meta))
    assert main(["eval", str(folder), "--windows", "1", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "size mismatch" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_sigterm_removes_the_unfinished_output(tmp_path, monkeypatch):
    import compress.pipeline

    def terminated(model, recipe, calib=None):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")
    monkeypatch.setattr(compress.pipeline, "apply_recipe", terminated)
    def unhandled(signum, frame):  # what the default action would do: end without cleanup
        raise SystemExit(143)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        out = tmp_path / "out"
        assert main(["quantize", "random:tiny", "--method", "rtn", "--out", str(out)]) == 130
        assert os.listdir(tmp_path) == []
        assert signal.getsignal(signal.SIGTERM) is unhandled   # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_while_starting_is_exit_130(monkeypatch, capsys):
    """Building the parser imports torch and transformers: seconds in which Ctrl-C used to
    print a traceback from inside an import."""
    import compress.cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(compress.cli, "build_parser", interrupted)
    assert main(["eval", "random:tiny"]) == 130
    assert capsys.readouterr().err.strip() == ("compress: interrupted while starting; nothing "
                                               "was written")


def test_a_gguf_model_loaded_with_packed_linears_is_refused(tiny):
    """Transformers may keep GGUF weights packed in its own layer classes; the passes would
    then miss those layers. Seen through a stand-in class, as no GGUF here loads that way."""
    from torch import nn

    from compress.sources import check_plain_linears

    class GgufLinear(nn.Linear):
        pass

    check_plain_linears(tiny.model, "x")     # the float model passes
    layer = tiny.model.model.layers[0].mlp
    layer.down_proj = GgufLinear(layer.down_proj.in_features, layer.down_proj.out_features)
    with pytest.raises(UserError, match=r"packed layers \(GgufLinear\)"):
        check_plain_linears(tiny.model, "GGUF file m.gguf")


def test_a_checkpoint_has_the_umasks_usual_modes(tiny, tmp_path):
    """mkdtemp makes a private (0700) folder: the saved checkpoint must not stay so.
    Catches: _default_permissions skipped."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "ck"
        save_checkpoint(tiny.model, tiny.tokenizer, str(out), None, {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for child in out.iterdir():
        assert stat.S_IMODE(child.stat().st_mode) == (0o755 if child.is_dir() else 0o644), child


def test_a_checkpoint_missing_a_tensor_is_refused(tiny, tmp_path):
    model = rtn(tiny.model, RTNConfig(bits=4, group_size=32))
    save_checkpoint(model, tiny.tokenizer, str(tmp_path / "ck"), None, {})
    path = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.mlp.down_proj.scales"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing"):
        load_checkpoint(str(tmp_path / "ck"))
