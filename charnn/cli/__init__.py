"""The ``charnn`` command line: a thin click layer over the Python API.

Each command group lives in its own module; errors meant for the user
(:class:`charnn.errors.CharnnError`) print as one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys

import click

from ..errors import CharnnError, cli_wording


MAX_THREADS = 1024
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}  # the disk's fault


def _silence_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class OneLineUsageError(click.UsageError):
    """A click usage error (unknown option, bad value, missing argument) shown like charnn's own errors:
    one ``error: ...`` line naming the problem and where the help is (click's own shows three lines and "Error:")."""

    def show(self, file=None) -> None:
        message = self.format_message()
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"error: {message[:1].lower()}{message[1:]}{hint}", err=True, file=file)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser (the benchmark scripts') whose mistakes print as charnn's own errors do: one ``error: ...``
    line naming the problem and where the help is, exit code 2 (argparse's own prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _one_line(e: click.UsageError) -> click.UsageError:
    if isinstance(e, (OneLineUsageError, getattr(click.exceptions, "NoArgsIsHelpError", ()))):  # click >= 8.2
        return e  # already converted, or a bare group name that shows its help
    return OneLineUsageError(e.format_message(), e.ctx)


class CharnnGroup(click.Group):
    """Click group that turns CharnnError into ``error: ...`` and an exit code, and click's usage errors
    into the same one-line form (exit code 2); its commands' messages name settings by their flags."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx):
        try:
            with cli_wording():
                return super().invoke(ctx)
        except CharnnError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # a full disk or a full stdout (> /dev/full) is the machine's problem, not a bug
            if e.errno not in WRITE_ERRORS:
                raise
            _silence_stdout()  # the interpreter's own flush at exit would fail (and print) again
            where = e.filename or "the output"
            click.echo(f"error: cannot write {where} ({e.strerror}); free some space or write somewhere else", err=True)
            sys.exit(CharnnError.exit_code)
        except click.UsageError as e:
            raise _one_line(e) from None


def refuse_to_replace(path: str | None, force: bool, option: str) -> None:
    """An existing file at ``path`` (an output option's value) is an error unless ``--force`` was given."""
    from pathlib import Path  # noqa: PLC0415

    if path and not force and Path(path).is_file():  # a folder or a device: the writer says what to give instead
        raise CharnnError(f"{path} already exists; pass --force to replace it, or choose another {option}")


@contextlib.contextmanager
def reports_interruption(as_json: bool, **fields):
    """Ctrl-C inside the block: one line on stderr and exit 130 (not click's "Aborted!" and 1); with ``as_json``
    also one JSON object on stdout, ``{"interrupted": true, **fields}``, so a script reading stdout still gets one."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("\ninterrupted (Ctrl-C) before any result was printed", err=True)
        if as_json:
            click.echo(json.dumps({"interrupted": True, **fields}, ensure_ascii=False))
        sys.exit(130)


@click.group(cls=CharnnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="charnn")
@click.option("--threads", metavar="INTEGER", envvar="CHARNN_THREADS",
              help="CPU threads for PyTorch (default: one per core; or set CHARNN_THREADS). Use 1 per process when "
                   "several charnn jobs share a machine: oversubscribed cores slow training many times over.")
@click.pass_context
def main(ctx, threads):
    """charnn: character-level recurrent neural networks.

    Train a model on your text, sample from it, classify text with it, or use
    it as an autocomplete engine.
    """
    if threads is not None:
        from_env = ctx.get_parameter_source("threads") is click.core.ParameterSource.ENVIRONMENT
        count = thread_count(threads, "CHARNN_THREADS" if from_env else "--threads")
        import torch  # noqa: PLC0415 (keeps `charnn --help` fast)

        torch.set_num_threads(count)


def thread_count(text: str, name: str) -> int:
    """``text`` (the --threads value or CHARNN_THREADS, named ``name``) as a usable PyTorch thread count."""
    count = int(text) if text.strip().isdigit() else None
    if count is None or not 1 <= count <= MAX_THREADS:  # torch crashes (a segmentation fault) on absurd counts
        raise CharnnError(f"{name} must be a whole number between 1 and {MAX_THREADS}, got {text!r}")
    return count


# Each module registers its commands on ``main`` when imported.
from . import corpus  # noqa: E402,F401
from . import train  # noqa: E402,F401
from . import complete  # noqa: E402,F401
from . import sample  # noqa: E402,F401
from . import classify  # noqa: E402,F401
