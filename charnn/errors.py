"""User-facing errors: raised for bad input, printed by the CLI as one line; how a message names a setting; the
type checks of user settings, and the checks of an output file's path."""

import contextlib
import contextvars
import numbers
import os
from pathlib import Path

_CLI_WORDING = contextvars.ContextVar("charnn_cli_wording", default=False)
FLAGS = {"time_budget": "--time"}  # the flags that are not the parameter's name with dashes
_NO_VALUE = object()


class CharnnError(Exception):
    """A problem caused by the user's input or environment, with a fix in its message.

    The CLI prints ``error: <message>`` and exits with status 2; library users
    can catch it to tell user mistakes from bugs.
    """

    exit_code = 2


def setting(name: str, value=_NO_VALUE) -> str:
    """How an error message names the setting ``name`` (a Python parameter, e.g. ``"batch_size"``), with ``value``
    if given: inside a ``charnn`` command, the flag (``--batch-size``, ``--cell rnn``; ``True`` gives the bare flag);
    from the Python API, the parameter (``batch_size``, ``cell='rnn'``). Each reader sees what they typed."""
    if _CLI_WORDING.get():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is _NO_VALUE or value is True else f"{flag} {value}"
    return name if value is _NO_VALUE else f"{name}={value!r}"


def off_value(cli: str, python: str = "None") -> str:
    """The value that switches a setting off, as the caller writes it: ``cli`` on the command line (``"0"``),
    ``python`` from the Python API."""
    return cli if _CLI_WORDING.get() else python


def check_settings(checks) -> None:
    """Raise a :class:`CharnnError` for the first failed ``(ok, name, problem)`` check: "<setting name> <problem>",
    or the problem alone where ``name`` is None."""
    for ok, name, problem in checks:
        if not ok:
            raise CharnnError(problem if name is None else f"{setting(name)} {problem}")


@contextlib.contextmanager
def cli_wording():
    """Inside the block, :func:`setting` names command-line flags (the ``charnn`` command runs in one)."""
    token = _CLI_WORDING.set(True)
    try:
        yield
    finally:
        _CLI_WORDING.reset(token)


def is_integer(value) -> bool:
    """An integer of any integral type (Python or numpy), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


SEED_LIMIT = 2**63  # torch's (and the samplers') seeds are 64-bit integers: a seed must be below this


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
        raise CharnnError(_cannot_create(directory, _blocking_file(directory) or e.strerror or e, what)) from None


def check_creatable(directory: Path, what: str) -> None:
    """Refuse, before anything is written, a ``directory`` that :func:`make_dirs` could not create: a file stands
    in its way, or the nearest existing folder above it cannot be written."""
    reason = _blocking_file(directory)
    if reason is None:
        existing = next(p for p in (directory, *directory.parents) if p.exists())
        if existing != directory and not os.access(existing, os.W_OK | os.X_OK):
            reason = f"{existing} is not writable"
    if reason:
        raise CharnnError(_cannot_create(directory, reason, what))


def _blocking_file(directory: Path) -> str | None:
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    return f"{blocker} is a file" if blocker else None


def _cannot_create(directory: Path, reason, what: str) -> str:
    return f"cannot create directory {directory} ({reason}); give {what} in a folder you can write"
