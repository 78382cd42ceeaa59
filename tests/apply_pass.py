"""A registered pass applied by name, as a recipe step would, for the pass tests."""
from compress.calibration import CalibrationData
from compress.passes import build_config, pass_table


def apply_pass(model, name, tokens=None, **fields):
    """Pass `name` with `fields` on `model`, calibrating on `tokens` in batches of 2 on the CPU
    (no tokens: no calibration data, as a recipe gives a data-free pass)."""
    spec = pass_table()[name]
    calib = None if tokens is None else CalibrationData(tokens, 2, "cpu")
    return spec.apply(model, build_config(spec, fields), calib)
