"""Training curves as a PNG (matplotlib is the optional 'plot' extra)."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from .errors import CharnnError
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
    """Plot training loss and validation bpc against steps; returns the PNG path."""
    run_dir = Path(run_dir)
    records = ckpt.read_metrics(run_dir)
    train = [(r["step"], bits_per_char(r["train_loss"])) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_bpc"]) for r in records if "val_bpc" in r]
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
    out = Path(output) if output else run_dir / "curves.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
