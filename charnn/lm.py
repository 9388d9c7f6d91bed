"""Loading a trained character language model for inference: ``charnn.load`` and :class:`LanguageModel`.

::

    lm = charnn.load("checkpoints/my-run")        # best model of a run; None: the latest run
    print(lm.generate("ROMEO:", length=200, temperature=0.8, random_seed=7))
    for ch in lm.stream("ROMEO:", length=200):    # characters as they are produced
        print(ch, end="", flush=True)
    lm.score("To be, or not to be").bpc           # bits per character
    lm.next_char_probs("To b")                    # {'e': 0.93, ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import checkpoint as ckpt
from .devices import pick_device
from .errors import CharnnError
from .inference import Stepper
from .model import CharRNN, ModelConfig
from .sampling import DEFAULT_SEED, Sample, SampleRun, SamplingOptions, encode_text
from .vocab import Vocabulary


def load_language_model(path: str | Path | None = None, *, which: str = "best", device: str | torch.device = "cpu"):
    """Build a :class:`CharRNN` from a checkpoint (run or checkpoint directory; None: the latest run).

    Returns ``(model, checkpoint)``, the model in eval mode on ``device``.
    """
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    config, ck = read_language_model(path, which=which)
    model = CharRNN(config)
    ck.load_weights(model)
    return model.to(device).eval(), ck


def read_language_model(path: str | Path | None = None, *, which: str = "best") -> tuple[ModelConfig, ckpt.Checkpoint]:
    """A language model's settings and checkpoint (config and vocabulary, no weights), checked as
    :func:`load_language_model` checks them."""
    ck = ckpt.load_checkpoint(path, which=which, kind="language-model")  # None: the latest language model
    if ck.kind != "language-model":
        raise CharnnError(f"{ck.path} is a {ck.kind} checkpoint, not a language model; pass a run made by charnn train")
    return ck.model_config(), ck


# -- the inference API: charnn.load(...) -------------------------------------------------------------
@dataclass
class TextScore:
    """How likely a model finds a text: per-character natural-log probabilities and their summaries."""

    text: str
    logprobs: np.ndarray  # (len(text),) float64: log p(text[i] | context + text[:i])

    @property
    def chars(self) -> int:
        return len(self.logprobs)

    @property
    def total_logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def nats_per_char(self) -> float:
        return -self.total_logprob / self.chars if self.chars else float("nan")

    @property
    def bpc(self) -> float:
        """Bits per character (lower is better)."""
        return self.nats_per_char / math.log(2)

    def to_dict(self) -> dict:
        return {"chars": self.chars, "total_logprob": self.total_logprob, "nats_per_char": self.nats_per_char,
                "bpc": self.bpc, "logprobs": self.logprobs.tolist()}


class LanguageModel:
    """A trained character model ready to generate and score text.

    Get one with :func:`charnn.load`. ``generate`` and ``stream`` continue a
    seed; ``sample`` makes several samples as one batch; ``score`` and
    ``next_char_probs`` read the model's probabilities. Generation runs on a
    :class:`~charnn.inference.Stepper` (built on first use).
    """

    def __init__(self, model: CharRNN, vocab: Vocabulary, *, checkpoint_path: str | Path | None = None):
        if len(vocab) != model.config.vocab_size:
            raise CharnnError(f"the vocabulary ({len(vocab)}) does not match the model ({model.config.vocab_size})")
        self.model = model.eval()
        self.vocab = vocab
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self._stepper: Stepper | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, *, which: str = "best",
                        device: str | torch.device = "cpu") -> "LanguageModel":
        model, ck = load_language_model(path, which=which, device=device)
        return cls(model, ck.vocab, checkpoint_path=ck.path)

    def __repr__(self) -> str:
        c = self.config
        return (f"LanguageModel({c.layers}x{c.hidden} {c.cell.upper()}, {len(self.vocab)} symbols, "
                f"checkpoint={str(self.checkpoint_path) if self.checkpoint_path else None!r})")

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def stepper(self) -> Stepper:
        if self._stepper is None:
            self._stepper = Stepper(self.model, device=self.device)
        return self._stepper

    # -- generation -------------------------------------------------------------------------------------
    def sampler(self, seed: str | None = None, *, strict: bool = False, **options) -> SampleRun:
        """A :class:`~charnn.sampling.SampleRun`: iterate it to stream ``(sample, piece)``, or ``.run()``."""
        return SampleRun(self.stepper, self.vocab, seed, SamplingOptions(**options), strict=strict)

    def sample(self, seed: str | None = None, *, num_samples: int = 1, strict: bool = False, **options) -> list[Sample]:
        """``num_samples`` continuations generated together; each a :class:`~charnn.sampling.Sample`."""
        return self.sampler(seed, strict=strict, num_samples=num_samples, **options).run()

    def generate(self, seed: str | None = None, length: int = 200, temperature: float = 1.0, *,
                 top_k: int | None = None, top_p: float | None = None, stop=(), random_seed: int | None = None,
                 allow_unknown: bool = False, strict: bool = False, precision: str = "auto") -> str:
        """The continuation of ``seed`` (not including it): ``length`` characters, or fewer at a ``stop`` string.

        ``temperature`` 0 is greedy; ``top_k``/``top_p`` restrict the draw to
        the likeliest characters; the same ``random_seed`` gives the same text.
        No seed: generation starts after a newline. ``precision``: the CPU
        kernel's arithmetic (``auto``, ``fp32`` or ``bf16``; see :mod:`charnn.native`).
        """
        return self.sample(seed, length=length, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                           random_seed=random_seed, allow_unknown=allow_unknown, strict=strict, logprobs=False,
                           precision=precision)[0].text

    def stream(self, seed: str | None = None, length: int = 200, temperature: float = 1.0, *,
               top_k: int | None = None, top_p: float | None = None, stop=(), random_seed: int | None = None,
               allow_unknown: bool = False, strict: bool = False, precision: str = "auto") -> Iterator[str]:
        """Like :meth:`generate`, yielding the characters as they are produced."""
        run = self.sampler(seed, length=length, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                           random_seed=random_seed, allow_unknown=allow_unknown, strict=strict, logprobs=False,
                           precision=precision)
        for _, piece in run:
            yield from piece

    # -- probabilities ------------------------------------------------------------------------------------
    def score(self, text: str, *, context: str | None = None, strict: bool = False, chunk: int = 4096) -> TextScore:
        """Log-probability of every character of ``text`` after ``context`` (None or "": a newline, as at the
        start of a file), read ``chunk`` characters at a time."""
        if not isinstance(text, str):
            raise CharnnError(f"score needs a string, got {type(text).__name__}")
        if context is not None and not isinstance(context, str):
            raise CharnnError(f"score's context must be a string, got {type(context).__name__}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise CharnnError(f"score's chunk must be a positive integer, got {chunk!r}")
        ids = encode_text(self.vocab, (context or "") + text, strict=strict, what="text",
                          prefix="" if context else DEFAULT_SEED)  # the prime is charnn's, not the caller's
        inputs, targets = ids[:-1], ids[1:]
        out, state = [], None
        with torch.inference_mode():
            for start in range(0, len(inputs), chunk):
                x = torch.as_tensor(inputs[start:start + chunk], device=self.device)[None]
                logits, state = self.model(x, state)
                lp = torch.log_softmax(logits[0].double(), -1)
                y = torch.as_tensor(targets[start:start + chunk], device=self.device)
                out.append(lp.gather(1, y[:, None])[:, 0].cpu().numpy())
        logprobs = np.concatenate(out) if out else np.zeros(0)
        return TextScore(text, logprobs[len(logprobs) - len(text):])

    def next_char_probs(self, text: str = "", *, strict: bool = False) -> dict[str, float]:
        """The distribution of the character after ``text`` (default: after a newline), likeliest first."""
        ids = encode_text(self.vocab, text, strict=strict, what="text", prefix="" if text else DEFAULT_SEED)
        logits, _ = self.stepper.prime(torch.as_tensor(ids)[None])
        probs = torch.softmax(logits[0].double(), -1).cpu().numpy()
        order = np.argsort(-probs, kind="stable")
        return {self.vocab.chars[i]: float(probs[i]) for i in order}


def load(path: str | Path | None = None, *, which: str = "best", device: str | torch.device = "cpu") -> LanguageModel:
    """Load a trained language model: a run directory (its best model unless ``which="last"``),
    a checkpoint directory, or None for the most recent run under ``checkpoints/``.

    >>> lm = charnn.load("checkpoints/shakespeare")
    >>> lm.generate("ROMEO:", length=100, temperature=0.8, random_seed=1)
    """
    return LanguageModel.from_checkpoint(path, which=which, device=device)
