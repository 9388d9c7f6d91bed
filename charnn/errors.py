"""User-facing errors: raised for bad input, printed by the CLI as one line; the type checks of user settings,
and the checks of an output file's path."""

import numbers
from pathlib import Path


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


def check_output_file(path: Path, what: str, example: str = "") -> None:
    """Refuse an output path that is a folder or a special file (an atomic rename would replace the node itself).

    ``what`` names the output in the message ("the corpus"); ``example`` may follow it (", e.g. out.png").
    """
    if path.is_dir():
        raise CharnnError(f"{path} is a directory; give a file name for {what}{example}")
    if path.exists() and not path.is_file():
        raise CharnnError(f"{path} is not a regular file (a device, pipe or socket); give a file name for {what}")


def make_dirs(directory: Path, what: str) -> None:
    """Create ``directory`` and the folders above it; failing, a :class:`CharnnError` asks for ``what`` somewhere
    writable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharnnError(f"cannot create directory {directory} ({e.strerror or e}); "
                          f"give {what} in a folder you can write") from None
