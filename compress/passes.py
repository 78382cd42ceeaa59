"""The pass registry: a pass is a config dataclass plus one function `(model, config, calib)`.

`@register_pass` only tags the function; `pass_table()` collects the tagged functions of the
modules listed in PASS_MODULES, so importing a module changes no shared state.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Callable

from compress.errors import UserError, choices

# Modules whose functions carry @register_pass. Add a module here to add its passes.
PASS_MODULES = ("compress.quant.rtn", "compress.quant.gptq", "compress.quant.awq",
                "compress.quant.smoothquant", "compress.quant.fp8", "compress.quant.bnb",
                "compress.prune.unstructured", "compress.prune.structured")


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    apply: Callable
    needs_calibration: bool
    kind: str  # "quantize" or "prune": which CLI sub-command offers it


def register_pass(name: str, config_cls: type, needs_calibration: bool = False,
                  kind: str = "quantize"):
    def tag(fn):
        fn.pass_spec = PassSpec(name, config_cls, fn, needs_calibration, kind)
        return fn
    return tag


def pass_table() -> dict[str, PassSpec]:
    table = {}
    for module_name in PASS_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            spec = getattr(value, "pass_spec", None)
            if isinstance(spec, PassSpec):
                table[spec.name] = spec
    return table


def build_config(spec: PassSpec, fields: dict):
    """Strictly build a pass config from a mapping (YAML or CLI): unknown fields are errors."""
    known = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    unknown = set(fields) - set(known)
    if unknown:
        allowed = f"allowed: {choices(known)}" if known else "it takes no options"
        raise UserError(f"unknown field(s) {choices(unknown)} for pass {spec.name!r}; {allowed}")
    hints = typing.get_type_hints(spec.config_cls)
    values = {name: coerce(f"{spec.name}.{name}", value, hints[name])
              for name, value in fields.items()}
    return spec.config_cls(**values)


def coerce(where: str, value, hint):
    """Check a YAML/CLI value against a simple type hint (bool, int, float, str, their Optionals)."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise UserError(f"{where} must be of type {base.__name__}, got {value!r}")


def config_to_dict(spec_name: str, config) -> dict:
    return {"pass": spec_name, **dataclasses.asdict(config)}


# Order rules the passes enforce on the model as they run, checked on a recipe's pass names up
# front so a bad chain fails before any calibration rather than after its first passes ran.
# Dropping whole layers works on any layer; the lm-head pass touches only the output projection.
SPARSITY_PASSES = ("magnitude", "wanda", "sparsegpt")
REFIT_PASSES = ("mlp-channels", "heads")   # refit dense rows / columns: would refill zeros


def check_order(names: list[str], where: str) -> None:
    """Refuse a chain that a pass would refuse once the model reaches it: anything but `layers`
    and `lm-head` after a pass that quantized the decoder linears (they need float nn.Linear),
    structured refits after a sparsity pass, the lm-head pass twice."""
    table = pass_table()
    quantized = sparse = head = None
    for i, name in enumerate(names):
        here = f"{where}: passes[{i}] {name!r}"
        if quantized is not None and name not in ("layers", "lm-head"):
            raise UserError(f"{here} comes after {quantized}, which already quantized the decoder "
                            "linears; put pruning first and quantize them once")
        if sparse is not None and name in REFIT_PASSES:
            raise UserError(f"{here} after {sparse} would break its zeros; put structured "
                            "pruning (mlp-channels, heads) before magnitude / wanda / sparsegpt")
        if name == "lm-head":
            if head is not None:
                raise UserError(f"{here} repeats {head}; quantize the lm_head once")
            head = f"passes[{i}]"
        elif table[name].kind == "quantize":
            quantized = f"passes[{i}] {name!r}"
        elif name in SPARSITY_PASSES:
            sparse = f"passes[{i}] {name!r}"
