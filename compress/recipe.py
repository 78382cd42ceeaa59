"""Strict recipes: YAML or CLI flags -> a Recipe of validated pass configs, and `apply_recipe`.

A recipe file:

    name: int4-g64-sym
    model: smollm2-135m          # optional; the CLI may give or override it
    corpus: pydoc
    calibration: {samples: 64, seq_len: 512}
    evaluation: {windows: 20, seq_len: 1024, batch_size: 1}
    passes:
      - {pass: rtn, bits: 4, group_size: 64, symmetric: true}

Unknown keys anywhere are errors that list the allowed ones. `resolved()` is what gets saved.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field

import yaml

import compress
from compress.errors import UserError, choices
from compress.formats.base import FLOAT_DTYPES
from compress.passes import build_config, check_order, coerce, config_to_dict, pass_table
from compress.prune.common import refresh_sparsity


CALIBRATION_DTYPES = ("bfloat16", "float16")  # of FLOAT_DTYPES: autocast only lowers precision


@dataclass
class CalibrationSettings:
    samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    # Where each layer is calibrated and compressed; None: the model's device. `cuda` with the
    # model on the CPU keeps one layer at a time on the GPU: a model larger than the GPU can be
    # compressed. Where does not change what: it is left out of the recipe hash (and out of the
    # resolved recipe when unset).
    device: str | None = None
    # What the calibration forwards compute in (autocast), as GPU toolkits calibrate an fp16
    # model; statistics and the compression math stay float32. None: the weights' own dtype.
    # On a CPU with native bfloat16 (AVX512-BF16, AMX) bfloat16 halves the matmul time: GPTQ of
    # SmolLM2-135M took 88-93 s instead of 107-121 s, perplexity 14.720 against 14.719; AWQ lost
    # more (15.071 against 14.875: its grid searches moved), reports/smollm2-135m-calibrated.
    # It changes what comes out, so it is in the recipe hash.
    dtype: str | None = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Also called after CLI flags have overridden a recipe's values."""
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"calibration {name} must be a positive integer, got {value!r}")
        if self.dtype is not None and self.dtype not in CALIBRATION_DTYPES:
            raise UserError(f"calibration dtype must be one of {', '.join(CALIBRATION_DTYPES)} "
                            f"(or unset: the weights' own), got {self.dtype!r}")

    def compute_dtype(self):
        """The torch dtype the calibration forwards autocast to; None: none."""
        return None if self.dtype is None else FLOAT_DTYPES[self.dtype]


@dataclass
class EvaluationSettings:
    enabled: bool = True
    windows: int | None = None      # None: the corpus default (PROTOCOL.md)
    seq_len: int | None = None
    batch_size: int = 1

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Also called after CLI flags have overridden a recipe's values."""
        for name, least in (("windows", 1), ("seq_len", 2), ("batch_size", 1)):
            value = getattr(self, name)
            if value is None and name != "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"evaluation {name} must be an integer >= {least}, "
                                f"got {value!r}")


@dataclass
class BenchSettings:
    """Speed before and after, measured by `compress run` (PROTOCOL.md 'Speed'), written as the
    same `compress bench` flags: batches "1,8,32", prefill "1x2048,8x512"."""
    batches: str = "1,8,32"
    prompt: int = 512
    new: int = 128
    prefill: str = "1x2048,8x512"
    warmup: int = 2
    repeats: int = 5
    compile: bool = False
    tune_kernels: bool = False  # coordinate-descent tuning of the compiled step's Triton kernels
    compile_prefill: bool = False  # the prefill forward compiled too (one graph per prompt shape)
    semi_structured: bool = False
    fuse_projections: bool = False  # q/k/v and gate/up as one matmul each (evaluate/fuse.py)
    gqa_decode: bool = False  # decode attention without repeat_kv (evaluate/attention.py)
    profile: bool = False  # profile a few decode steps and a prefill after timing them
    kernel: str = ""  # FORMAT=KERNEL pairs, e.g. "int4=triton"; "" keeps the measured defaults


@dataclass
class Recipe:
    name: str
    passes: list = field(default_factory=list)       # (pass name, config) pairs
    model: str | None = None
    corpus: str = "pydoc"
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    bench: BenchSettings | None = None                # None: no speed measurement

    def needs_calibration(self) -> bool:
        table = pass_table()
        return any(table[name].needs_calibration for name, _ in self.passes)

    def resolved(self) -> dict:
        """Every default filled in, with the package version: saved beside every output."""
        out = {"name": self.name, "model": self.model, "corpus": self.corpus,
               "calibration": {k: v for k, v in dataclasses.asdict(self.calibration).items()
                               if not (k in ("device", "dtype") and v is None)},
               "evaluation": dataclasses.asdict(self.evaluation),
               "passes": [config_to_dict(name, cfg) for name, cfg in self.passes],
               "compress_version": compress.__version__}
        if self.bench is not None:
            out["bench"] = dataclasses.asdict(self.bench)
        out["hash"] = recipe_hash(out)
        return out


TOP_LEVEL = {"name", "description", "model", "corpus", "calibration", "evaluation", "bench",
             "passes"}


def recipe_hash(resolved: dict) -> str:
    """What the compressed model is: its source, passes and (where a pass reads them) the
    calibration data. How it is measured (evaluation, bench) is not what it is."""
    body = {k: v for k, v in resolved.items()
            if k not in ("hash", "compress_version", "name", "bench", "evaluation")}
    if not calibrates(resolved):   # without a calibrating pass, neither corpus nor samples count
        body.pop("calibration", None)
        body.pop("corpus", None)
    elif "calibration" in body:    # where a layer is calibrated does not change what comes out
        body["calibration"] = {k: v for k, v in body["calibration"].items() if k != "device"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def calibrates(resolved: dict) -> bool:
    """Whether any pass of a resolved recipe reads calibration data (RTN, for one, does not)."""
    table = pass_table()
    return any(table[p["pass"]].needs_calibration for p in resolved.get("passes") or ()
               if p.get("pass") in table)


def load_recipe(path: str) -> Recipe:
    if os.path.isdir(path):
        raise UserError(f"recipe {path!r} is a folder; give a recipe YAML file (see recipes/)")
    if not os.path.isfile(path):
        raise UserError(f"recipe file {path!r} does not exist")
    try:
        with open(path) as handle:
            data = load_yaml(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    default_name = os.path.splitext(os.path.basename(path))[0]
    return recipe_from_dict(data, default_name, where=path)


def recipe_from_dict(data, default_name: str, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping with keys: {choices(TOP_LEVEL)}")
    unknown = set(data) - TOP_LEVEL
    if unknown:
        raise UserError(f"{where}: unknown key(s) {choices(unknown)}; allowed: {choices(TOP_LEVEL)}")
    passes = data.get("passes")
    if not isinstance(passes, list) or not passes:
        raise UserError(f"{where}: 'passes' must be a non-empty list of {{pass: NAME, ...fields}}")
    if data.get("model") is not None and not isinstance(data["model"], str):
        raise UserError(f"{where}: model must be a model source string such as smollm2-135m, "
                        f"got {data['model']!r}")
    if "corpus" in data and not isinstance(data["corpus"], str):
        raise UserError(f"{where}: corpus must be a corpus name or file such as pydoc, got "
                        f"{data['corpus']!r}")
    parsed = [parse_pass(entry, f"{where}: passes[{i}]") for i, entry in enumerate(passes)]
    check_order([name for name, _ in parsed], where)
    if "name" in data and not isinstance(data["name"], str):
        raise UserError(f"{where}: name must be a string such as int4-g64-sym (quote it), got "
                        f"{data['name']!r}")
    return Recipe(
        name=check_name(data.get("name", default_name), where),
        passes=parsed,
        model=data.get("model"),
        corpus=data.get("corpus", "pydoc"),
        calibration=_section(CalibrationSettings, data.get("calibration"), f"{where}: calibration"),
        evaluation=_section(EvaluationSettings, data.get("evaluation"), f"{where}: evaluation"),
        bench=(None if data.get("bench") is None else
               _section(BenchSettings, data["bench"], f"{where}: bench")),
    )


# A recipe's name becomes a file name in a sweep folder (NAME.json): one plain path component,
# none of the names a sweep writes itself, and not results / compress: `compress report` reads a
# folder holding results.json or compress.json as one checkpoint, not as a sweep.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
RESERVED_NAMES = ("baseline", "failures", "results", "compress")


def check_name(name: str, where: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
        raise UserError(f"{where}: recipe name {name!r} must be letters, digits, '.', '_', '+' "
                        f"or '-' (not starting with a symbol) and not "
                        f"{' or '.join(RESERVED_NAMES)}")
    return name


def load_yaml(stream):
    """yaml.safe_load, but numbers as YAML 1.2 reads them: an unquoted N:M pattern such as 2:4
    stays the string '2:4' (YAML 1.1, PyYAML's default, reads it as 124 in base 60), and 1e-2 is
    the float 0.01 (YAML 1.1 wants a dot, 1.0e-2, and reads 1e-2 as a string)."""
    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag not in (int_tag, float_tag)]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

        def construct_mapping(self, node, deep=False):
            # A key given twice is an error, not the last value silently (PyYAML keeps the last).
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue   # `<<: *anchor` merges defaults; keys after it override them
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    break   # unhashable: the base class raises its own error
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"key {key!r} given twice (line {key_node.start_mark.line + 1})",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    def construct_int(loader, node):
        # YAML 1.2: 010 is ten (not octal eight), 0o10 is eight, 0x10 sixteen.
        text = loader.construct_scalar(node).replace("_", "")
        lower = text.lower()
        try:
            return int(text, 16 if "0x" in lower else 8 if "0o" in lower else 10)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is not an integer", node.start_mark) from None

    Loader.add_constructor(int_tag, construct_int)
    # Integers first: a plain 5 matches both.
    Loader.add_implicit_resolver(int_tag, re.compile(
        r"^(?:[-+]?[0-9][0-9_]*|[-+]?0o[0-7_]+|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"))
    Loader.add_implicit_resolver(float_tag, re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return yaml.load(stream, Loader=Loader)


def parse_pass(entry, where: str):
    table = pass_table()
    if not isinstance(entry, dict) or "pass" not in entry:
        raise UserError(f"{where} must be a mapping with a 'pass' key; passes: {choices(table)}")
    fields = dict(entry)
    name = fields.pop("pass")
    if not isinstance(name, str) or name not in table:
        raise UserError(f"{where}: unknown pass {name!r}; allowed: {choices(table)}")
    return name, build_config(table[name], fields)


def _section(cls, data, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {choices(unknown)}; allowed: {choices(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(f"{where}.{k}", v, hints[k]) for k, v in data.items()})


def apply_recipe(model, recipe: Recipe, calib=None):
    """Apply every pass in order. `calib` (token samples) is needed by calibrated passes."""
    table = pass_table()
    for name, config in recipe.passes:
        spec = table[name]
        if spec.needs_calibration and calib is None:
            raise UserError(f"pass {name!r} needs calibration samples")
        model = spec.apply(model, config, calib)
    refresh_sparsity(model)
    return model
