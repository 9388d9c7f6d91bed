"""Training budgets: how much of ``--max-steps``/``--max-epochs``/``--time`` a run has used, and its progress bar.

Both trainers (the language model's and the classifier's) mix in :class:`BudgetClock`
and show a :class:`BudgetBar`, so the schedule, the stop test and the bar agree.
"""

from __future__ import annotations

import math
import time

from .errors import CharnnError, setting


def budget_progress(cfg, step: int, epochs: float, elapsed: float) -> float:
    """Fraction of a budget used (any config with max_steps, max_epochs, time_budget): the largest part."""
    parts = [0.0]
    if cfg.max_steps:
        parts.append(step / cfg.max_steps)
    if cfg.max_epochs:
        parts.append(epochs / cfg.max_epochs)
    if cfg.time_budget:
        parts.append(elapsed / cfg.time_budget)
    return max(parts)


def budget_spent(cfg, step: int, epochs: float, elapsed: float) -> str | None:
    """Which limit of the budget is reached, if any: max-steps, max-epochs or time."""
    if cfg.max_steps and step >= cfg.max_steps:
        return "max-steps"
    if cfg.max_epochs and epochs >= cfg.max_epochs - 1e-9:
        return "max-epochs"
    if cfg.time_budget and elapsed >= cfg.time_budget:
        return "time"
    return None


class BudgetClock:
    """Steps, epochs and seconds of a training run, for a class with ``cfg``, ``step``, ``epoch``,
    ``batch_in_epoch``, ``steps_per_epoch`` and ``elapsed_before`` (seconds of earlier sessions)."""

    _started: float | None = None

    def start_clock(self) -> None:
        self._started = time.perf_counter()

    def _elapsed(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.elapsed_before + running

    def _epoch_progress(self) -> float:
        return self.epoch + self.batch_in_epoch / max(self.steps_per_epoch, 1)

    def progress(self) -> float:
        """Fraction of the budget used: the largest of steps, epochs and time."""
        return budget_progress(self.cfg, self.step, self._epoch_progress(), self._elapsed())

    def _budget_spent(self) -> str | None:
        return budget_spent(self.cfg, self.step, self._epoch_progress(), self._elapsed())

    def patience_spent(self) -> bool:
        """Early stopping: ``patience`` evaluations in a row without improvement."""
        return bool(self.cfg.patience) and self.bad_evals >= self.cfg.patience

    def why_finished(self) -> str | None:
        """Why the run has nothing left to train (its budget is spent, or ``early-stopping``), or None."""
        return "early-stopping" if self.patience_spent() else self._budget_spent()


class BudgetBar:
    """tqdm bar over steps, or over seconds when the budget is a time limit; the caller supplies the postfix."""

    def __init__(self, clock: BudgetClock, disable: bool):
        from tqdm.auto import tqdm  # noqa: PLC0415 (tqdm.auto picks the notebook widget where there is one)

        self.clock, cfg = clock, clock.cfg
        self.by_time = bool(cfg.time_budget)
        totals = [cfg.max_steps] if cfg.max_steps else []
        if cfg.max_epochs:
            totals.append(int(math.ceil(cfg.max_epochs * clock.steps_per_epoch)))
        total = cfg.time_budget if self.by_time else (min(totals) if totals else None)
        self.bar = tqdm(total=total, initial=0 if self.by_time else clock.step, disable=disable, dynamic_ncols=True,
                        unit="s" if self.by_time else "step", leave=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}{postfix}]"
                        if self.by_time else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def update(self, postfix: str) -> None:
        c = self.clock
        self.bar.update((min(c._elapsed(), self.bar.total) if self.by_time else c.step) - self.bar.n)
        self.bar.set_postfix_str(f"{postfix}, ep {c._epoch_progress():.2f}", refresh=False)


BUDGET_SETTINGS = {"max-steps": "max_steps", "max-epochs": "max_epochs", "time": "time_budget"}  # stop reason: setting


def check_resumable(trainer, run_dir) -> None:
    """A run that already spent its budget, or stopped early, has nothing left to train: say so (for ``--resume``)."""
    reason = trainer.why_finished()
    if reason == "early-stopping":
        raise CharnnError(f"{run_dir} stopped early ({trainer.bad_evals} evaluations without improvement), so its best "
                          f"model is final; to train more, start a new run from it ({setting('init_from')})")
    if reason in BUDGET_SETTINGS:
        flag = setting(BUDGET_SETTINGS[reason])
        raise CharnnError(f"{run_dir} has trained {trainer.step} steps ({trainer._epoch_progress():.2f} epochs), already "
                          f"as much as the {flag} budget allows; give a larger {flag} to train on")
    if reason:
        raise CharnnError(f"{run_dir} is finished ({reason}); nothing is left to train")
