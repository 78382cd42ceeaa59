"""Compressed checkpoints: safetensors weights + HF config + tokenizer + compress.json.

compress.json holds the resolved recipe, the provenance, the package version and the spec of
every quantized module, so that `load_checkpoint` rebuilds the exact modules and reloads the
exact bytes. Writes go to a temporary folder beside the output, moved into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import compress
from compress.adapters import set_submodule
from compress.errors import UserError, user_error_on
from compress.evaluate.results import default_mode
from compress.formats import FORMATS
from compress.formats.base import FLOAT_DTYPES, QuantizedLinear
from compress.prune.common import saved_reports

WEIGHTS = "model.safetensors"
META = "compress.json"


def check_output(out_dir: str, overwrite: bool, folder: bool = True) -> None:
    """Fail before any work when the output exists and may not be replaced, or cannot be
    written. A folder output never replaces a file (--overwrite replaces an output folder)."""
    if folder and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output {out_dir} is a file, not a folder; give a folder path")
    if os.path.exists(out_dir) and not overwrite:
        raise UserError(f"output {out_dir} exists; pass --overwrite to replace it")
    check_writable(out_dir)


def check_out_spares_inputs(out: str, overwrite: bool, inputs: list[str], model: str | None
                            ) -> None:
    """Refuse an `out` inside the source model's folder (a source model is never modified,
    --overwrite or not), and, where --overwrite would replace an existing `out`, one that is or
    holds an input (the source model, a recipe, a corpus file, results to render) or the
    current folder."""
    root = os.path.realpath(out)
    if isinstance(model, str) and os.path.isdir(model):
        source = os.path.realpath(model)
        if root.startswith(source + os.sep):   # `out` equal to it: the input check below
            raise UserError(f"--out {out} lies inside the source model {model}; writing there "
                            "would modify it, choose another --out")
    if not overwrite or not os.path.exists(out):
        return
    cwd = os.getcwd()
    for path in [*inputs, cwd]:
        real = os.path.realpath(path)
        if os.path.exists(path) and (real == root or real.startswith(root + os.sep)):
            what = "the current folder" if path is cwd else f"the input {path}"
            held = "is" if real == root else "holds"
            raise UserError(f"--out {out} {held} {what}; --overwrite would delete it, choose "
                            "another --out")


def check_output_file(path: str, overwrite: bool) -> None:
    """The same for one file (a results JSON, a report): not a folder, not an existing file
    unless it may be replaced, writable."""
    if os.path.isdir(path):
        raise UserError(f"output {path} is a folder; give a file name, such as "
                        f"{os.path.join(path, 'results.json')}")
    check_output(path, overwrite, folder=False)


def check_writable(path: str) -> None:
    """Fail before any work when `path` (a file or folder to be written) cannot be created:
    a temporary folder is made and removed where its nearest existing parent is."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"cannot write output {path}: {ancestor} is not a folder")
    with user_error_on(f"cannot write output {path}", OSError):
        os.rmdir(tempfile.mkdtemp(prefix=".compress-probe-", dir=ancestor))


@contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool):
    """Yield a temporary folder; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    with user_error_on(f"cannot write output {out_dir}", OSError):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        _default_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir) and not overwrite:
        # Created by someone else while this run worked: neither output is thrown away.
        raise UserError(f"output {out_dir} appeared while this run wrote it; this run's output "
                        f"is kept in {tmp}")
    if os.path.exists(out_dir):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.replace(out_dir, os.path.join(trash, "old"))
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _default_permissions(folder: str) -> None:
    """mkdtemp/mkstemp create private files; give the output the umask's usual modes."""
    os.chmod(folder, default_mode(directory=True))
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        os.chmod(path, default_mode(directory=os.path.isdir(path)))


def write_checkpoint(model: nn.Module, tokenizer, folder: str, recipe: dict | None,
                     provenance: dict) -> None:
    """Write a checkpoint into an existing (temporary) folder."""
    state = _unique_state_dict(model)
    save_file(state, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    meta = {
        "compress_version": compress.__version__,
        "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "recipe": recipe,
        "provenance": provenance,
        "modules": {name: module.spec() for name, module in model.named_modules()
                    if isinstance(module, QuantizedLinear)},
    }
    shapes = _reshaped_linears(model)
    if shapes:
        meta["shapes"] = shapes
    reports = saved_reports(model)
    if reports:  # the sparsity reached, the structure removed: true of these weights for good
        meta["reports"] = reports
    with open(os.path.join(folder, META), "w") as handle:
        json.dump(meta, handle, indent=2)


def save_checkpoint(model: nn.Module, tokenizer, out_dir: str, recipe: dict | None,
                    provenance: dict, overwrite: bool = False) -> None:
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_checkpoint(model, tokenizer, tmp, recipe, provenance)


def read_meta(folder: str) -> dict:
    with open(os.path.join(folder, META)) as handle:
        return json.load(handle)


def load_checkpoint(folder: str, dtype: torch.dtype | None = None):
    """Rebuild the model of `folder` with its saved modules and bytes. Returns a `Loaded`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from compress.sources import Loaded

    meta = read_meta(folder)
    saved_dtype = FLOAT_DTYPES.get(meta["dtype"])
    if saved_dtype is None:
        raise UserError(f"checkpoint {folder}: compress.json has dtype {meta['dtype']!r}; "
                        f"allowed: {', '.join(FLOAT_DTYPES)}")
    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    for name, (out_features, in_features, bias) in meta.get("shapes", {}).items():
        # Per-layer structured pruning: shapes the config alone cannot describe.
        set_submodule(model, name, nn.Linear(in_features, out_features, bias=bias,
                                             dtype=saved_dtype))
    for name, spec in meta["modules"].items():
        if spec["format"] not in FORMATS:
            raise UserError(f"checkpoint {folder} uses format {spec['format']!r}, unknown to "
                            f"compress {compress.__version__}; known: {', '.join(FORMATS)}")
        set_submodule(model, name, FORMATS[spec["format"]].from_spec(spec, saved_dtype))
    state = load_file(os.path.join(folder, WEIGHTS))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor whose shape is not the one config / compress.json give
        raise UserError(f"checkpoint {folder} does not match its config or compress.json: "
                        f"{_first_mismatch(exc)}") from exc
    tied = tied_names(model)
    if unexpected or set(missing) - tied:
        raise UserError(f"checkpoint {folder} does not match its config: missing "
                        f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    if meta.get("reports"):
        model.compress_report = dict(meta["reports"])
    if dtype is not None and dtype != saved_dtype:
        model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder) if os.path.exists(
        os.path.join(folder, "tokenizer_config.json")) else None
    provenance = dict(meta["provenance"], checkpoint=os.path.abspath(folder),
                      recipe=meta["recipe"])
    return Loaded(model.eval(), tokenizer, provenance)


def _first_mismatch(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
    return lines[0] if lines else str(exc).strip().splitlines()[0]


def _reshaped_linears(model: nn.Module) -> dict[str, list]:
    """[out, in, bias] of float linears whose shape differs from what model.config builds
    (structured pruning with per-layer widths); empty when the config describes every shape."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = dict(AutoModelForCausalLM.from_config(model.config).named_modules())
    return {name: [m.out_features, m.in_features, m.bias is not None]
            for name, m in model.named_modules()
            if type(m) is nn.Linear and isinstance(reference.get(name), nn.Linear)
            and reference[name].weight.shape != m.weight.shape}


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def tied_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {name for name, _ in model.named_parameters(remove_duplicate=False)
            if name.endswith("lm_head.weight")} | {"lm_head.weight"}


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
