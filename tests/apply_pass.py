"""A registered pass applied by name, as a recipe step would, for the pass tests."""
from compress.calibration import CalibrationData
from compress.passes import build_config, pass_table


def apply_pass(model, name, tokens, **fields):
    """Pass `name` with `fields` on `model`, calibrating on `tokens` in batches of 2 on the CPU."""
    spec = pass_table()[name]
    return spec.apply(model, build_config(spec, fields), CalibrationData(tokens, 2, "cpu"))
