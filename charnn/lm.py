"""Loading a trained character language model for inference."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .devices import pick_device
from .errors import CharnnError
from .model import CharRNN, ModelConfig


def load_language_model(path: str | Path | None = None, *, which: str = "best", device: str | torch.device = "cpu"):
    """Build a :class:`CharRNN` from a checkpoint (run or checkpoint directory; None: the latest run).

    Returns ``(model, checkpoint)``, the model in eval mode on ``device``.
    """
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    ck = ckpt.load_checkpoint(path, which=which)
    if ck.kind != "language-model":
        raise CharnnError(f"{ck.path} is a {ck.kind} checkpoint, not a language model; pass a run made by charnn train")
    try:
        config = ModelConfig.from_dict(ck.config["model"])
    except (KeyError, TypeError) as e:
        raise CharnnError(f"{ck.path / ckpt.CONFIG} is damaged (model settings: {e}); use another checkpoint") from e
    if config.vocab_size != len(ck.vocab):
        raise CharnnError(f"{ck.path}: the vocabulary ({len(ck.vocab)}) does not match the model ({config.vocab_size}); the checkpoint is damaged")
    model = CharRNN(config)
    ck.load_weights(model)
    return model.to(device).eval(), ck
