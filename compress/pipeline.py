"""Orchestration shared by the CLI sub-commands: load, calibrate, apply, save, evaluate.

Algorithms never see this module's arguments; they get a model, a config and calibration data.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch

from compress.calibration import CalibrationData
from compress.checkpoint import atomic_output_dir, write_checkpoint
from compress.data import (TokenizedCorpus, calibration_samples, eval_windows, load_corpus,
                           window_shape)
from compress.errors import UserError
from compress.evaluate.divergence import Reference, evaluate_windows
from compress.evaluate.memory import parameter_count, weight_bytes
from compress.evaluate.perplexity import perplexity
from compress.evaluate.results import build_results, write_json
from compress.evaluate.timing import PeakMemory
from compress.recipe import EvaluationSettings, Recipe, apply_recipe, calibrates
from compress.sources import Loaded, check_device, load_model


@dataclass
class Session:
    """A loaded source model and its tokenized corpus, reused across recipes."""

    loaded: Loaded
    corpus: TokenizedCorpus
    device: str

    @classmethod
    def open(cls, source: str, corpus: str = "pydoc", device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> "Session":
        loaded = load_model(source, dtype=dtype, device=device)
        if loaded.tokenizer is None:
            if loaded.provenance.get("loader") not in (None, "random"):
                # Only a random model is tokenized by bytes; any other would be scored on token
                # ids its embedding never learned: a wrong perplexity without a word. (Timing
                # reads token ids only: compress bench loads such a checkpoint.)
                raise UserError(f"{source} has no tokenizer (tokenizer_config.json); copy the "
                                "tokenizer files written with it")
            from compress.sources import byte_tokenizer

            loaded.tokenizer = byte_tokenizer()
        return cls(loaded, load_corpus(corpus, loaded.tokenizer, loaded.model.config.vocab_size),
                   device)


def evaluation_windows(session: Session, settings: EvaluationSettings) -> torch.Tensor:
    """The protocol's evaluation windows [count, seq_len] (settings override the corpus default)."""
    seq_len, count = window_shape(session.corpus.name, settings.seq_len, settings.windows)
    positions = getattr(session.loaded.model.config, "max_position_embeddings", None)
    if positions and seq_len > positions:
        raise UserError(f"evaluation windows of {seq_len} tokens exceed the model's {positions} "
                        f"positions; use --seq-len {positions} or less")
    return eval_windows(session.corpus, seq_len, count)


def evaluate(session: Session, model, settings: EvaluationSettings, recipe: dict | None,
             desc: str = "perplexity", extra_metrics: dict | None = None,
             reference: Reference | None = None, record_into: Reference | None = None) -> dict:
    """Perplexity and weight memory of `model` on the session's corpus: a results dict.

    With `reference` (the baseline's distribution on the same windows) the same forward pass also
    gives kl_divergence and top1_agreement; `record_into` stores this model's as the reference.
    """
    windows = evaluation_windows(session, settings)
    seq_len = windows.shape[1]
    started = time.perf_counter()
    if reference is None and record_into is None:
        ppl = perplexity(model, windows, settings.batch_size, session.device, desc=desc)
    else:
        ppl = evaluate_windows(model, windows, settings.batch_size, session.device,
                               reference=reference, record_into=record_into, desc=desc)
    metrics = {**ppl, "weight_bytes": weight_bytes(model),
               "eval_seconds": round(time.perf_counter() - started, 2), **(extra_metrics or {})}
    protocol = {"corpus": session.corpus.name, "eval_seq_len": seq_len,
                "eval_windows": windows.shape[0], "dtype": str(_dtype(model)).removeprefix("torch."),
                "device": session.device}
    if reference is not None:
        protocol["divergence"] = reference.describe()
    if recipe and calibrates(recipe):
        protocol["calibration"] = dict(recipe["calibration"], source=_calibration_source(
            session, recipe))
    model_info = {"source": session.loaded.provenance.get("source"),
                  "provenance": session.loaded.provenance,
                  "architecture": getattr(model.config, "model_type", None),
                  "parameters": parameter_count(model)}
    return build_results(model_info, recipe, protocol, metrics, session.device)


def _calibration_source(session: Session, recipe: dict) -> str:
    """Where the calibration samples came from. A checkpoint evaluated on another corpus than
    the one it was calibrated on: the samples were not this corpus's calibration split."""
    corpus = recipe.get("corpus")
    if corpus in (None, session.corpus.name):
        return session.corpus.calib_source
    return f"corpus {corpus!r} (evaluated on {session.corpus.name!r})"


def compress_model(session: Session, recipe: Recipe):
    """A compressed copy of the session's model (the source is never modified) and pass timing."""
    model = copy.deepcopy(session.loaded.model)
    calib = None
    s = recipe.calibration
    device = s.device or session.device
    if recipe.needs_calibration():
        s.check()
        check_device(device, "calibration device")
        calib = CalibrationData(calibration_samples(session.corpus, s.samples, s.seq_len),
                                s.batch_size, device, s.compute_dtype())
    with PeakMemory(device) as peak:
        started = time.perf_counter()
        model = apply_recipe(model, recipe, calib)
        seconds = round(time.perf_counter() - started, 2)
    if peak.peak is not None:
        stats = getattr(model, "compress_report", None) or {}
        model.compress_report = {**stats, "compress_peak_gpu_bytes": peak.peak}
    return model, seconds


def run_recipe(session: Session, recipe: Recipe, out_dir: str | None, overwrite: bool,
               do_eval: bool, measure=None, extra_json: dict | None = None) -> dict | None:
    """Compress, then save to `out_dir` (with results.json when evaluated); returns the results.

    measure(results, model, name) -> results adds figures (speed) to the evaluated model's
    results; extra_json {file name: dict} is written into the same folder, atomically with it.
    """
    resolved = recipe.resolved()
    if do_eval:  # windows the corpus or the model cannot give fail now, not after compressing
        evaluation_windows(session, recipe.evaluation)

    def produce():
        model, seconds = compress_model(session, recipe)
        peak = (getattr(model, "compress_report", None) or {}).get("compress_peak_gpu_bytes")
        print(f"compressed in {seconds:.1f} s" +
              (f"; peak GPU memory {peak / 2**30:.2f} GiB" if peak is not None else ""))
        if not do_eval:
            return model, None
        results = evaluate(session, model, recipe.evaluation, resolved, desc=recipe.name,
                           extra_metrics={"compress_seconds": seconds,
                                          **(getattr(model, "compress_report", None) or {})})
        return model, (results if measure is None else measure(results, model, recipe.name))

    if out_dir is None:
        return produce()[1]
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model, results = produce()
        write_checkpoint(model, session.loaded.tokenizer, tmp, resolved, session.loaded.provenance)
        if results is not None:
            write_json(results, os.path.join(tmp, "results.json"))
        for name, doc in (extra_json or {}).items():
            write_json(doc, os.path.join(tmp, name))
    return results


def _dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
