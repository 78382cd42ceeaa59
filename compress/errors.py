"""The one error type that reaches users as a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a wrong name, field, value, path or an unreachable hub.

    The message is a single line that says what was wrong and what is allowed.
    """


def choices(values) -> str:
    return ", ".join(str(v) for v in sorted(values))
