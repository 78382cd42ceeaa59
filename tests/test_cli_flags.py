"""Every documented flag of quantize, run, eval, bench and sweep reaches the config it names.
The work itself is replaced by a recorder: the flags are checked where the command hands them
over, in milliseconds."""
import pytest
import torch

from compress.cli import main


class Stop(Exception):
    pass


def _record(monkeypatch, module, name, into):
    def recorder(*args, **kwargs):
        into.append((args, kwargs))
        raise Stop
    monkeypatch.setattr(module, name, recorder)


def _run(argv):
    with pytest.raises(Stop):
        main(argv)


def _int8_recipe(folder, *lines):
    """An int8 RTN recipe file in `folder`, with any further top-level `lines`."""
    path = folder / "int8.yaml"
    path.write_text("\n".join(["name: int8", *lines, "passes:", "  - {pass: rtn, bits: 8}", ""]))
    return path


def test_quantize_flags_reach_the_recipe_and_the_session(monkeypatch, tmp_path):
    from compress.commands import quantize

    calls = []
    _record(monkeypatch, quantize, "run_recipe", calls)
    _run(["quantize", "random:tiny", "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--symmetric", "--option", "block-size=64", "--calib-samples", "3",
          "--calib-seq-len", "48", "--calib-dtype", "bfloat16", "--calib-device", "cpu",
          "--eval", "--windows", "3", "--seq-len", "40", "--batch-size", "2", "--corpus", "random",
          "--dtype", "bfloat16", "--out", str(tmp_path / "q")])
    (session, recipe, out, overwrite), kwargs = calls[0]
    (name, config), = recipe.passes
    assert (name, config.bits, config.group_size, config.symmetric) == ("gptq", 4, 32, True)
    assert config.block_size == 64                     # --option FIELD with a dash
    cal, ev = recipe.calibration, recipe.evaluation
    assert (cal.samples, cal.seq_len, cal.dtype, cal.device) == (3, 48, "bfloat16", "cpu")
    assert (ev.windows, ev.seq_len, ev.batch_size) == (3, 40, 2)
    assert recipe.corpus == "random" and kwargs.get("do_eval", True) is True
    assert next(session.loaded.model.parameters()).dtype == torch.bfloat16


def test_eval_flags_reach_the_evaluation(monkeypatch):
    from compress.commands import eval as eval_command

    calls = []
    _record(monkeypatch, eval_command, "evaluate", calls)
    _run(["eval", "random:tiny", "--corpus", "random", "--windows", "3", "--seq-len", "40",
          "--batch-size", "2", "--dtype", "float16"])
    (session, model, settings, recipe), _ = calls[0]
    assert (settings.windows, settings.seq_len, settings.batch_size) == (3, 40, 2)
    assert next(model.parameters()).dtype == torch.float16
    assert session.corpus.name == "random"


def test_bench_flags_reach_the_bench_config(monkeypatch):
    from compress.evaluate import bench_run

    calls = []
    _record(monkeypatch, bench_run, "run_bench", calls)
    _run(["bench", "random:tiny", "--batch", "1,2", "--prompt", "8", "--new", "4",
          "--prefill", "1x16,2x8", "--compile", "--tune-kernels", "--warmup", "0", "--repeats",
          "3", "--peers", "none", "--kernel", "int4=triton", "--dtype", "bfloat16"])
    (source, cfg, device, dtype), _ = calls[0]
    assert (cfg.batches, cfg.prompt, cfg.new, cfg.prefill) == ((1, 2), 8, 4, ((1, 16), (2, 8)))
    assert (cfg.compile, cfg.tune_kernels, cfg.warmup, cfg.repeats) == (True, True, 0, 3)
    assert cfg.peers == () and cfg.kernel_choices == (("int4", "triton"),)
    assert dtype == torch.bfloat16


def test_sweep_flags_reach_the_bench_and_task_settings(monkeypatch, tmp_path):
    from compress.cli import build_parser
    from compress.commands import sweep

    args = build_parser().parse_args(
        ["sweep", "r.yaml", "--model", "random:tiny", "--out", "x", "--bench", "--bench-batch",
         "1,2", "--bench-prompt", "8", "--bench-new", "4", "--bench-prefill", "1x16",
         "--bench-warmup", "0", "--bench-repeats", "3", "--compile",
         "--bench-kernel", "int4=triton"])
    cfg = sweep.bench_config(args)
    assert (cfg.batches, cfg.prompt, cfg.new, cfg.prefill) == ((1, 2), 8, 4, ((1, 16),))
    assert (cfg.warmup, cfg.repeats, cfg.compile) == (0, 3, True)
    assert cfg.kernel_choices == (("int4", "triton"),)

    recipe = _int8_recipe(tmp_path)
    calls = []
    _record(monkeypatch, sweep, "TaskRunner", calls)
    _run(["sweep", str(recipe), "--model", "random:tiny", "--out", str(tmp_path / "s"),
          "--tasks", "pydoc_mc", "--tasks-limit", "5", "--tasks-fewshot", "1",
          "--tasks-batch-size", "4"])
    settings = calls[0][0][0]
    assert (settings.limit, settings.num_fewshot, settings.batch_size) == (5, 1, 4)

    calls.clear()
    _record(monkeypatch, sweep, "sweep", calls)
    _run(["sweep", str(recipe), "--model", "random:tiny", "--out", str(tmp_path / "t"),
          "--kl-cache-gb", "0.5", "--windows", "1", "--seq-len", "32"])
    assert calls[0][0][4] == 2**29                      # cache_bytes


def test_sweep_title_heads_the_report(tmp_path, capsys):
    recipe = _int8_recipe(tmp_path)
    out = tmp_path / "s"
    assert main(["sweep", str(recipe), "--model", "random:tiny", "--out", str(out),
                 "--title", "Nightly int8", "--windows", "1", "--seq-len", "32"]) == 0
    assert (out / "report.md").read_text().startswith("# Nightly int8\n")
    assert "<h1>Nightly int8</h1>" in (out / "report.html").read_text()


def test_run_model_flag_overrides_the_recipes_model(monkeypatch, tmp_path):
    from compress.commands import run as run_command

    recipe = _int8_recipe(tmp_path, "model: random:no-such-shape")
    calls = []
    _record(monkeypatch, run_command, "run_recipe", calls)
    _run(["run", str(recipe), "--model", "random:tiny", "--out", str(tmp_path / "r")])
    (session, recipe_obj, *_), _ = calls[0]
    assert recipe_obj.model == "random:tiny"
