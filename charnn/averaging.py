"""Weight averaging over the end of a training run (tail averaging, as in SWA).

Late in a run, with a small learning rate, a model's validation loss still
moves by about 0.01 bits/char from one evaluation to the next, depending on
which part of the text it trained on last. The uniform average of the weights
over the last part of the run smooths that out (Izmailov et al. 2018,
"Averaging Weights Leads to Wider Optima and Better Generalization").

:class:`WeightAverage` keeps a running mean of a model's trainable parameters;
``applied()`` swaps the mean in for evaluation or saving, then swaps it out.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class WeightAverage:
    """Running uniform mean of ``model``'s trainable parameters."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mean: list[torch.Tensor] | None = None
        self.count = 0

    def update(self) -> None:
        """Add the current weights to the mean."""
        self.count += 1
        current = [p.detach() for p in self.params]
        if self.mean is None:
            self.mean = [p.clone() for p in current]
        else:
            torch._foreach_lerp_(self.mean, current, 1.0 / self.count)

    def reset(self) -> None:
        self.mean, self.count = None, 0

    @contextlib.contextmanager
    def applied(self):
        """Within the block the model holds the averaged weights (unchanged when nothing is averaged yet)."""
        if not self.count:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.mean)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"average.{i}": t for i, t in enumerate(self.mean or [])}

    def load(self, count: int, tensors: dict[str, torch.Tensor]) -> None:
        self.count = count
        self.mean = [tensors[f"average.{i}"].to(p.device, p.dtype).clone() for i, p in enumerate(self.params)] if count else None
