"""User-facing errors: raised for bad input, printed by the CLI as one line; and the type checks of user settings."""

import numbers


class CharnnError(Exception):
    """A problem caused by the user's input or environment, with a fix in its message.

    The CLI prints ``error: <message>`` and exits with status 2; library users
    can catch it to tell user mistakes from bugs.
    """

    exit_code = 2


def is_integer(value) -> bool:
    """An integer of any integral type (Python or numpy), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number of any type (Python or numpy), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
