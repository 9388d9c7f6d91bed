"""Training curves as a PNG (matplotlib is the optional 'plot' extra)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import checkpoint as ckpt
from .errors import CharnnError, check_output_file, make_dirs
from .model import bits_per_char


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CharnnError("plotting needs matplotlib; install it with: pip install 'charnn[plot]'") from e
    return plt


def plot_curves(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Plot a run's curves against steps; returns the PNG path.

    A language model: training loss and validation bpc, in bits per character. A classifier: training
    loss (cross-entropy in nats) above validation macro-F1; an ensemble run draws each member's curves.
    """
    run_dir = Path(run_dir)
    if ckpt.run_kind(run_dir) == "classifier":
        return _plot_classifier(run_dir, output)
    records = ckpt.read_metrics(run_dir)
    # a diverged run logs its non-finite losses as null: nothing to draw for them
    train = [(r["step"], bits_per_char(r["train_loss"])) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_bpc"]) for r in records if r.get("val_bpc") is not None]
    if not train and not val:
        raise CharnnError(f"{run_dir} has no metrics to plot; train for at least a few steps first")
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train (bits/char)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (bits/char)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, run_dir, output)


def _plot_classifier(run_dir: Path, output: str | Path | None) -> Path:
    """Training loss (nats) in the upper panel, validation macro-F1 in the lower, one pair of lines per member."""
    members = sorted((d for d in run_dir.glob("member-*") if d.is_dir() and d.name[7:].isdigit()),
                     key=lambda d: int(d.name[7:]))
    sources = [(f"member {d.name[7:]} ", ckpt.read_metrics(d)) for d in members] if members else [("", ckpt.read_metrics(run_dir))]
    curves = [(name, [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None],
               [(r["step"], r["val_macro_f1"]) for r in records if r.get("val_macro_f1") is not None])
              for name, records in sources]
    if not any(train or val for _, train, val in curves):
        raise CharnnError(f"{run_dir} has no metrics to plot; train for at least a few steps first")
    plt = require_matplotlib()
    fig, (loss_ax, f1_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5), dpi=100)
    for name, train, val in curves:
        if train:
            loss_ax.plot(*zip(*train), label=f"{name}train loss", alpha=0.7)
        if val:
            f1_ax.plot(*zip(*val), "o-", label=f"{name}validation macro-F1")
    loss_ax.set_ylabel("training loss (cross-entropy, nats)")
    loss_ax.set_title(run_dir.name + (f" (ensemble of {len(members)}; each member's steps)" if members else ""))
    f1_ax.set_ylabel("validation macro-F1")
    f1_ax.set_xlabel("step")
    for ax in (loss_ax, f1_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(plt, fig, run_dir, output)


def _save(plt, fig, run_dir: Path, output: str | Path | None) -> Path:
    return save_figure(plt, fig, Path(output) if output else run_dir / "curves.png")


def save_figure(plt, fig, out: str | Path, example: str = "curves.png") -> Path:
    """Write ``fig`` as a PNG at ``out`` atomically (a temporary file beside it, then a rename) and close it.

    Missing parent directories are created, as ``charnn corpus build -o`` does; a directory as ``out``,
    a parent that cannot be created and an unwritable place are a :class:`CharnnError`, with nothing written
    (``example``: a file name the message suggests inside a directory given as ``out``).
    """
    out = Path(out)
    try:
        check_output_file(out, "the PNG", f", e.g. {out / example}")
        if out.suffix and out.suffix.lower() != ".png":  # out.jpg held PNG bytes that viewers refused
            raise CharnnError(f"{out}: charnn writes PNG images; give a file name ending in .png, e.g. "
                              f"{out.with_suffix('.png')}")
        make_dirs(out.parent, "a PNG path")
        tmp = out.with_name(f".{out.name}.tmp.png")
        try:
            fig.savefig(tmp)
            tmp.replace(out)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CharnnError(f"cannot write {out} ({e.strerror or e}); give a PNG path you can write") from None
    finally:
        plt.close(fig)
    return out
