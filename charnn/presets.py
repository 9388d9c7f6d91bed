"""Recommended settings: named presets, and defaults sized for the device and budget.

``charnn train FILE`` with no options uses :func:`recommend`, so a user gets a
good model without tuning. The CPU defaults were chosen from the measurements
in ``benchmarks/RESULTS.md`` (tiny Shakespeare, 10-minute budget, 2 cores).
"""

from __future__ import annotations

import torch

from .errors import CharnnError, setting

# Settings shared by every preset unless it says otherwise.
COMMON = dict(
    cell="lstm", embed_dim=64, embed_dropout=0.0, weight_drop=0.0, tie_weights=False, init="orthogonal", forget_bias=1.0,
    activation="tanh", gate_slope=1.0, layer_norm=False, lr=2e-3, warmup_steps=100, optimizer="adam", weight_decay=0.0,
    weight_decay_ramp=None,
)

PRESETS: dict[str, dict] = {
    # seconds on a CPU: smoke tests and demos
    "tiny": dict(layers=1, hidden=128, embed_dim=32, dropout=0.0, batch_size=32, seq_len=64, lr=3e-3, warmup_steps=20),
    # a few minutes on a CPU (the default CPU model without a time budget, or under five minutes). A learning
    # rate of 8e-3 beat COMMON's 2e-3 by 0.068 bits/char over 3,000 steps of tiny Shakespeare (4e-3 by 0.056) and
    # by 0.055 over 2,000 steps of python-docs (benchmarks/RESULTS.md, session 9).
    "small": dict(layers=2, hidden=256, dropout=0.1, batch_size=16, seq_len=128, lr=8e-3),
    # ten minutes to an hour on a CPU, minutes on a GPU. The 2x384 over-fits tiny Shakespeare within ten
    # minutes on a CPU; AdamW's decoupled weight decay of 0.2 gained 0.024 bits/char there (0.1: 0.018). The
    # 2x256 of "small" lost 0.036 with it over 3,000 steps, where it does not over-fit, and the 2x384 lost 0.012
    # over 5.5 epochs (benchmarks/RESULTS.md, session 7): the decay pays on runs of about ten epochs or more,
    # so it follows the planned epochs: none up to 6, all of it from 10, linear in between. A peak learning rate
    # of 1e-2 beat 3e-3 by 0.036 bits/char over 9 epochs of tiny Shakespeare (4e-3, 5e-3 and 7e-3 fell in
    # between), by 0.06 over 10 epochs of python-docs and by 0.066 over a quarter of an epoch of python-stdlib;
    # over 5.5 epochs of tiny Shakespeare (no decay) it only tied 3e-3, where 5e-3 was 0.022 better
    # (benchmarks/RESULTS.md, session 9).
    "medium": dict(layers=2, hidden=384, dropout=0.2, batch_size=16, seq_len=128, lr=1e-2, optimizer="adamw",
                   weight_decay=0.2, weight_decay_ramp=[6.0, 10.0]),
    # hours on a GPU
    "large": dict(layers=3, hidden=1024, embed_dim=128, dropout=0.3, batch_size=128, seq_len=256, lr=1e-3,
                  warmup_steps=500),
}

DEFAULT_MAX_EPOCHS = 30


def preset_names() -> list[str]:
    return list(PRESETS)


CPU_MEDIUM_FROM = 5 * 60  # seconds of budget from which the 2x384 model learns more than the 2x256


def auto_preset(device: torch.device, time_budget: float | None) -> str:
    """The preset that learns best on ``device`` within ``time_budget`` seconds.

    Without a budget (train until early stopping or the epoch limit) a CPU gets
    the quick 2x256 model; with five minutes or more, the 2x384 one (the
    comparison on tiny Shakespeare is in benchmarks/RESULTS.md: in ten minutes
    it beat the 2x256 and the earlier 2x512 default). GPUs get the
    larger presets.
    """
    if device.type == "cuda":
        return "medium" if time_budget is not None and time_budget <= 10 * 60 else "large"
    if device.type == "mps":
        return "medium"
    return "medium" if time_budget is not None and time_budget >= CPU_MEDIUM_FROM else "small"


def recommend(device: torch.device, time_budget: float | None, preset: str | None) -> dict:
    """Every training default, from ``preset`` or, when None, from the device and budget."""
    if preset is not None and preset not in PRESETS:
        raise CharnnError(f"{setting('preset')} must be one of {', '.join(PRESETS)}, got {preset!r}")
    name = preset or auto_preset(device, time_budget)
    settings = {**COMMON, **PRESETS[name]}
    if time_budget is None:
        settings["max_epochs"] = DEFAULT_MAX_EPOCHS
    return settings
