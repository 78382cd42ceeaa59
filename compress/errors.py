"""The one error type that reaches users as a one-line message and exit code 2."""
import math
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: a wrong name, field, value, path or an unreachable hub.

    The message is a single line that says what was wrong and what is allowed.
    """


def check_number(field: str, value: float, low: float, strict: bool = False,
                 note: str = "") -> None:
    """`value` finite and >= `low` (> with `strict`). Written as a positive test: NaN compares
    False with everything, so a check written as `value < low` lets it through."""
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise UserError(f"{field} must be a finite number {'>' if strict else '>='} {low:g}{note}; "
                        f"got {value}")


def choices(values) -> str:
    return ", ".join(str(v) for v in sorted(values))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def user_error_on(prefix: str, *types: type[BaseException]):
    """Bad files surface as the libraries' own exceptions (a truncated safetensors file, text
    that is not UTF-8, a folder that cannot be created): turn those listed into a UserError
    "prefix: the error's first line"."""
    try:
        yield
    except types as exc:
        raise UserError(f"{prefix}: {first_line(exc)}") from exc
