"""`charnn plot`'s output file: missing folders are made, a folder or an impossible path is a one-line error."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from charnn.cli import main

pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")

PNG = b"\x89PNG\r\n\x1a\n"


def plot(*args):
    return CliRunner().invoke(main, ["plot", *map(str, args)])


def test_plot_creates_missing_parent_directories(tiny_run, tmp_path):
    out = tmp_path / "new" / "deeper" / "x.png"
    result = plot(tiny_run, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]  # no temporary file left beside it


def test_plot_to_a_directory_is_a_one_line_error(tiny_run, tmp_path):
    folder = tmp_path / "plots"
    folder.mkdir()
    result = plot(tiny_run, "-o", folder)
    assert result.exit_code == 2
    assert result.output == f"error: {folder} is a directory; give a file name for the PNG, e.g. {folder / 'curves.png'}\n"
    assert not any(folder.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_plot_under_a_file_is_a_one_line_error(tiny_run, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me", encoding="utf-8")
    result = plot(tiny_run, "-o", blocker / "x.png")
    assert result.exit_code == 2
    assert result.output.startswith(f"error: cannot create directory {blocker} (") and result.output.count("\n") == 1
    assert "give a PNG path in a folder you can write" in result.output
    assert blocker.read_text(encoding="utf-8") == "keep me"


def test_plot_keeps_an_existing_output_file_unless_forced(tiny_run, tmp_path):
    notes = tmp_path / "old.png"
    notes.write_text("keep me", encoding="utf-8")
    result = plot(tiny_run, "-o", notes)
    assert result.exit_code == 2
    assert result.output == f"error: {notes} already exists; pass --force to replace it, or choose another --output\n"
    assert notes.read_text(encoding="utf-8") == "keep me"
    forced = plot(tiny_run, "-o", notes, "--force")
    assert forced.exit_code == 0, forced.output
    assert notes.read_bytes()[:8] == PNG


def test_plot_never_replaces_a_pipe_or_device(tiny_run, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = plot(tiny_run, "-o", fifo, "--force")
    assert result.exit_code == 2
    assert result.output == f"error: {fifo} is not a regular file (a device, pipe or socket); give a file name for the PNG\n"
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_plot_refuses_a_name_that_promises_another_format(tiny_run, tmp_path):
    """-o curves.jpg wrote PNG bytes under a .jpg name."""
    result = plot(tiny_run, "-o", tmp_path / "curves.jpg")
    assert result.exit_code == 2
    assert result.output == (f"error: {tmp_path / 'curves.jpg'}: charnn writes PNG images; give a file name ending in "
                             f".png, e.g. {tmp_path / 'curves.png'}\n")
    assert not any(tmp_path.iterdir())
    assert plot(tiny_run, "-o", tmp_path / "curves.PNG").exit_code == 0
