"""Training a character language model with truncated backpropagation through time.

``train(TrainConfig(...))`` is the whole job behind ``charnn train``: read the
corpus, build or restore the model, run Adam (or AdamW) with warmup and cosine decay to
the end of the budget, validate in bits per character, keep the best and the
last checkpoint, and stop on the first of max epochs, max steps, the
wall-clock budget, early stopping or Ctrl-C/SIGTERM (which save a resumable
checkpoint first).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .averaging import WeightAverage
from .budget import BudgetBar, BudgetClock
from .data import Corpus, StreamBatcher, eval_streams, load_corpus
from .devices import autocast, pick_precision
from .distributed import DistContext, init_from_env, shutdown
from .errors import SEED_LIMIT, CharnnError, check_settings, is_integer, is_number, make_dirs, off_value, setting
from .model import CharRNN, ModelConfig, bits_per_char, fits_in_memory, sequence_loss
from .presets import recommend
from .vocab import UNK_ID

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("cosine", "plateau", "constant")
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name != "vocab_size")
RESUME_OVERRIDES = ("max_epochs", "max_steps", "time_budget", "device", "quiet", "grad_accum")  # a resume may change
# settings a fine-tuned model may change: its regularisation (the rest is the architecture it was trained with)
FINE_TUNE_FIELDS = ("dropout", "embed_dropout", "weight_drop")
PACE_SKIP_STEPS = 10  # a session's first steps carry one-off start-up costs: the pace is timed after them
DECAY_DECISION_STEPS = 50  # steps of a session after which a time budget's pace is known well enough


@dataclass
class TrainConfig:
    """Options of a training run. ``None`` means "the recommended value" (see ``presets``), except where a
    field's comment or the README says otherwise (``patience=None`` turns early stopping off)."""

    corpus: list[str] = field(default_factory=list)
    glob: str = "**/*"
    encoding: str = "utf-8"
    val_fraction: float = 0.1
    min_char_count: int = 1
    # model (None: from --preset or the device's recommendation)
    cell: str | None = None
    layers: int | None = None
    hidden: int | None = None
    embed_dim: int | None = None
    dropout: float | None = None
    embed_dropout: float | None = None
    weight_drop: float | None = None
    tie_weights: bool | None = None
    init: str | None = None
    forget_bias: float | None = None
    activation: str | None = None
    gate_slope: float | None = None
    layer_norm: bool | None = None
    # optimisation
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    optimizer: str | None = None  # None: the preset's
    weight_decay: float | None = None  # None: the preset's for its optimizer, else the optimizer's own default
    # [from, full] planned epochs: no decay up to ``from``, all of ``weight_decay`` from ``full``, linear between.
    # None: the preset's when the decay is the preset's too (medium: [6, 10]), else the decay is fixed.
    weight_decay_ramp: list[float] | None = None
    momentum: float = 0.9
    nesterov: bool = False
    grad_clip: float = 5.0
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    average_last: float = 0.2  # average the weights over this last fraction of the budget (0: off)
    grad_accum: int | None = 1
    # budget and validation
    max_epochs: float | None = None
    max_steps: int | None = None
    time_budget: float | None = None  # seconds
    eval_every: int | None = None
    patience: int | None = 5
    seed: int = 1234
    # run
    preset: str | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    out: str | None = None
    init_from: str | None = None
    log_every: int = 10
    quiet: bool = False

    def __post_init__(self):
        # From Python: one path may stand for a list of one (a str is not iterated as one-character paths), and
        # pathlib paths become the strings a run's JSON config stores.
        self.corpus = as_path_list(self.corpus, "corpus")
        self.out, self.init_from = as_path(self.out), as_absolute_path(self.init_from)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def as_path(value):
    """A pathlib (os.PathLike) path as the string a JSON config stores; anything else unchanged."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def as_absolute_path(value):
    """A path (str or os.PathLike) as an absolute string, so a run resumed or described from another folder finds
    it; anything else (None, '') unchanged."""
    value = as_path(value)
    return os.path.abspath(value) if isinstance(value, str) and value else value


def as_path_list(value, name: str) -> list:
    """Paths as a list of strings: one path (str or os.PathLike) is a list of one; None is empty. Anything else is
    a CharnnError naming the setting ``name``."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    try:
        paths = [as_path(p) for p in value]
    except TypeError:
        paths = [value]
    for p in paths:
        if not isinstance(p, str):
            raise CharnnError(f"{setting(name)} must be paths (str or pathlib.Path), got {p!r}")
    return paths


def check_types(cfg) -> None:
    """A config dataclass's bool, int and float settings (numpy scalars included; None where the field allows it)
    have those types, or a CharnnError names the field. Only Python callers can get these wrong: the CLI's options
    are typed, and a wrong type failed later as a TypeError or, for a truthy string such as "no", switched an
    option on."""
    for f in fields(cfg):
        value, kinds = getattr(cfg, f.name), set(str(f.type).replace(" ", "").split("|"))
        if value is None and "None" in kinds:
            continue
        if "bool" in kinds:
            ok, want = isinstance(value, (bool, np.bool_)), "True or False"
        elif "int" in kinds:
            ok, want = is_integer(value), "an integer"
        elif "float" in kinds:
            ok, want = is_number(value), "a number"
        else:
            continue
        if not ok:
            want += " of seconds" if f.name == "time_budget" else ""
            raise CharnnError(f"{f.name} must be {want}, got {value!r}")


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C or SIGTERM once a resumable checkpoint is written."""

    def __init__(self, run_dir: Path, signum: int, checkpoint: Path | None = None):
        super().__init__(f"training interrupted; resume with: charnn train --resume {run_dir}")
        self.run_dir, self.signum = run_dir, signum
        self.checkpoint = checkpoint or Path(run_dir) / "last"  # the resumable checkpoint just written

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs: float
    best_val_bpc: float | None
    last_val_bpc: float | None
    train_chars_per_sec: float
    elapsed: float
    stop_reason: str
    weight_decay: float | None = None  # the decay used in the end (it can follow the planned epochs)


def corpus_fingerprint(corpus: Corpus) -> str:
    """A short hash of the encoded training and validation text, so --resume can tell a changed corpus."""
    h = hashlib.sha256()
    for ids in (corpus.train, corpus.val):
        h.update(memoryview(np.ascontiguousarray(ids)).cast("B"))
        h.update(b"|")
    return h.hexdigest()[:16]


# -- setup helpers ------------------------------------------------------------------------------
def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}"),
        (cfg.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}"),
        (cfg.batch_size >= 1, "batch_size", f"must be at least 1, got {cfg.batch_size}"),
        (cfg.seq_len >= 1, "seq_len", f"must be at least 1, got {cfg.seq_len}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), "lr", f"must be a positive number, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, "momentum", f"must be in [0, 1), got {cfg.momentum}"),
        (cfg.warmup_steps >= 0, "warmup_steps", f"must be 0 or more, got {cfg.warmup_steps}"),
        (cfg.log_every >= 1, "log_every", f"must be at least 1, got {cfg.log_every}"),
        (cfg.weight_decay >= 0, "weight_decay", f"must be 0 (off) or positive, got {cfg.weight_decay}"),
        (cfg.grad_clip >= 0, "grad_clip", f"must be 0 (off) or positive, got {cfg.grad_clip}"),
        (cfg.grad_accum is not None and cfg.grad_accum >= 1, "grad_accum",
         f"must be at least 1, got {cfg.grad_accum}"),
        (cfg.min_char_count >= 1, "min_char_count", f"must be at least 1, got {cfg.min_char_count}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", f"must be at least 1, got {cfg.max_steps}"),
        (cfg.max_epochs is None or 0 < cfg.max_epochs < math.inf, "max_epochs",
         f"must be a positive (finite) number, got {cfg.max_epochs}"),
        (0 <= cfg.seed < SEED_LIMIT, "seed", f"must be in [0, 2**63), got {cfg.seed}"),
        (0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}"),
        (cfg.time_budget is None or cfg.time_budget > 0, "time_budget", f"must be positive, got {cfg.time_budget}"),
        (cfg.patience is None or cfg.patience >= 1, "patience",
         f"must be at least 1 ({off_value('0')} turns early stopping off), got {cfg.patience}"),
        (cfg.eval_every is None or cfg.eval_every >= 1, "eval_every", f"must be at least 1, got {cfg.eval_every}"),
        (0 <= cfg.average_last < 1, "average_last", f"must be in [0, 1), got {cfg.average_last}"),
        (cfg.weight_decay_ramp is None or (len(cfg.weight_decay_ramp) == 2 and 0 <= cfg.weight_decay_ramp[0]
                                           < cfg.weight_decay_ramp[1]), None,  # no flag: presets set it
         f"weight_decay_ramp must be [from, full] epochs with 0 <= from < full, got {cfg.weight_decay_ramp}"),
    ]
    check_settings(checks)


def _saved_config(data: dict) -> TrainConfig:
    """A run's training settings as its config.json holds them, checked as a new run's are."""
    cfg = TrainConfig.from_dict(data)
    check_types(cfg)
    _validate(cfg)
    return cfg


def _refuse_architecture(given: dict, model: ModelConfig, init_from: str) -> None:
    """Fine-tuning keeps the model's architecture: options that would set another are an error, not ignored."""
    fixed = [n for n, v in given.items() if n not in FINE_TUNE_FIELDS and v != getattr(model, n)]
    if fixed:
        flags = ", ".join(setting(n) for n in fixed)
        keep = f"{setting('dropout')}, {setting('embed_dropout')} and {setting('weight_drop')}"
        raise CharnnError(f"{flags}: {setting('init_from', init_from)} keeps that model's architecture and initialised "
                          f"weights; drop these options (only {keep} may change)")


def _fill_defaults(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Replace every ``None`` by the preset's or the device's recommended value."""
    if cfg.grad_accum is None:
        cfg.grad_accum = 1
    rec = recommend(device, cfg.time_budget, cfg.preset)
    if cfg.weight_decay is None and cfg.optimizer not in (None, rec["optimizer"]):
        cfg.weight_decay = default_weight_decay(cfg.optimizer)  # the preset's decay belongs to the preset's optimizer
    if cfg.weight_decay is not None and cfg.weight_decay_ramp is None:
        rec["weight_decay_ramp"] = None  # a decay the user chose is used as it is
    for name, value in rec.items():
        if getattr(cfg, name, None) is None:
            setattr(cfg, name, value)
    return cfg


def ramped_weight_decay(cfg: TrainConfig, planned_epochs: float) -> float:
    """The decay for a run of ``planned_epochs``: ``cfg.weight_decay`` scaled by ``cfg.weight_decay_ramp``.

    Decay regularises: it pays once a model starts to over-fit (the 2x384 on
    tiny Shakespeare after about ten epochs) and only slows a shorter run.
    """
    if cfg.weight_decay_ramp is None:
        return cfg.weight_decay
    start, full = cfg.weight_decay_ramp
    return cfg.weight_decay * min(max((planned_epochs - start) / (full - start), 0.0), 1.0)


def _fit_global_batch(cfg: TrainConfig, train_state: dict, world_size: int) -> None:
    """Keep a resumed run's global batch (its text streams) whatever the number of processes."""
    streams = train_state.get("global_streams", cfg.batch_size * cfg.grad_accum)
    per_process = cfg.grad_accum * world_size
    if streams % per_process:
        raise CharnnError(
            f"the run was trained with a global batch of {streams} streams, which {world_size} process(es) x "
            f"{setting('grad_accum', cfg.grad_accum)} cannot split evenly; choose {setting('grad_accum')} or a process "
            "count that divides it"
        )
    cfg.batch_size = streams // per_process


def default_weight_decay(optimizer: str) -> float:
    """PyTorch's own default: 0.01 for AdamW, whose decay is decoupled from the gradient; 0 for the others."""
    return 0.01 if optimizer == "adamw" else 0.0


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the trainable ``params``; a ``weight_decay`` of None is the optimizer's default."""
    params = [p for p in params if p.requires_grad]
    decay = cfg.weight_decay if cfg.weight_decay is not None else default_weight_decay(cfg.optimizer)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.95, weight_decay=decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=decay)


class LRSchedule:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at the end of the budget,
    or a constant rate, or halving on validation plateaus."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.plateau_factor = 1.0
        self.plateau_best = math.inf
        self.plateau_bad = 0

    def factor(self, step: int, progress: float) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            p = min(max(progress, 0.0), 1.0)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        if cfg.schedule == "plateau":
            return self.plateau_factor
        return 1.0

    def observe(self, val_loss: float) -> None:
        """Reduce-on-plateau: halve the rate after two evaluations without improvement."""
        if val_loss < self.plateau_best - 1e-4:
            self.plateau_best, self.plateau_bad = val_loss, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad >= 2:
                self.plateau_factor = max(self.plateau_factor * 0.5, self.cfg.min_lr_ratio)
                self.plateau_bad = 0

    def state(self) -> dict:
        return {"plateau_factor": self.plateau_factor, "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load(self, state: dict) -> None:
        self.plateau_factor = state["plateau_factor"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]


@torch.no_grad()
def evaluate(model: CharRNN, ids: np.ndarray, *, device: torch.device | str = "cpu", precision: str = "fp32",
             n_streams: int | None = None, seq_len: int = 256, ctx: DistContext | None = None) -> tuple[float, int]:
    """Mean loss in nats per character over every target of ``ids``, carrying state; and the count.

    ``ids`` is read as ``n_streams`` contiguous streams side by side (None: a
    few long ones, see :func:`charnn.data.eval_stream_count`).

    With a distributed ``ctx``, each process scores its share of the streams
    and the sums are all-reduced, giving the single-process figure.
    """
    device = torch.device(device)
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for x, y, mask in eval_streams(ids, n_streams, seq_len, ctx.rank, ctx.world_size):
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            with autocast(device, precision):
                logits, state = model(x, state)
            total += float(sequence_loss(logits, y, mask.float(), reduction="sum"))
            count += int(mask.sum())
    finally:
        model.train(was_training)
    total, count = ctx.sum([total, float(count)], device)
    return (total / count if count else float("nan")), int(count)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- the trainer ------------------------------------------------------------------------------
class Trainer(BudgetClock):
    """One training run; build with ``Trainer(cfg)``, or ``Trainer.resume(run_dir)``, then ``fit()``."""

    def __init__(self, cfg: TrainConfig, *, resume_from: ckpt.Checkpoint | None = None,
                 on_log: Callable[[dict], None] | None = None):
        check_types(cfg)
        self.dist = init_from_env(cfg.device)
        self.device = self.dist.device(cfg.device)
        self.given = {n: getattr(cfg, n) for n in MODEL_FIELDS if getattr(cfg, n) is not None}  # before the presets
        self.cfg = cfg if resume_from else _fill_defaults(cfg, self.device)
        if resume_from:
            _fit_global_batch(self.cfg, resume_from.train_state, self.dist.world_size)
        _validate(self.cfg)
        self.precision = pick_precision(self.cfg.precision, self.device)
        self.on_log = on_log
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.run_dir = Path(resume_from.path.parent) if resume_from else self._agree_on_run_dir()
        init = ckpt.load_checkpoint(self.cfg.init_from) if self.cfg.init_from and not resume_from else None
        if init and self.cfg.min_char_count != 1:
            raise CharnnError(f"{setting('min_char_count')}: {setting('init_from', self.cfg.init_from)} keeps that model's "
                              f"vocabulary; drop {setting('min_char_count')}")
        vocab = resume_from.vocab if resume_from else init.vocab if init else None
        self.corpus: Corpus = load_corpus(
            self.cfg.corpus, glob=self.cfg.glob, encoding=self.cfg.encoding, val_fraction=self.cfg.val_fraction,
            min_char_count=self.cfg.min_char_count, vocab=vocab, progress=not self.cfg.quiet and self.dist.is_main,
        )
        if not resume_from:  # --resume and eval-complete read the corpus again, from wherever they are run
            self.cfg.corpus = [os.path.abspath(p) for p in self.cfg.corpus]
        self.corpus_fingerprint = corpus_fingerprint(self.corpus)
        if resume_from and resume_from.train_state.get("corpus_fingerprint", self.corpus_fingerprint) != \
                self.corpus_fingerprint:  # runs from before the fingerprint resume as they did
            raise CharnnError(f"the corpus changed since {self.run_dir} started ({', '.join(self.cfg.corpus)}); "
                              "resuming needs the same text: restore it, or start a new run on the new text "
                              f"with {setting('init_from', str(self.run_dir))}")
        self.model_config = self._model_config(resume_from or init, fine_tuning=init is not None)
        for name in MODEL_FIELDS:  # the run's settings say what it really used (fine-tuning keeps the architecture)
            setattr(self.cfg, name, getattr(self.model_config, name))
        torch.manual_seed(self.cfg.seed)
        with fits_in_memory(self.model_config):
            self.model = CharRNN(self.model_config).to(self.device)
        if init:
            init.load_weights(self.model, self.device)
        self.batcher = StreamBatcher(self.corpus.train, self.cfg.batch_size, self.cfg.seq_len, self.rank,
                                     self.world_size, self.cfg.grad_accum)
        self.optimizer = make_optimizer(self.cfg, self.model.parameters())
        self.planned_epochs: float | None = None
        self.decay_decided = self.cfg.weight_decay_ramp is None
        if not self.decay_decided:
            self._set_weight_decay(0.0)  # until the budget's epochs are known (after warmup for a time budget)
        self.schedule = LRSchedule(self.cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        trained = self.ddp or self.model
        self.step_fn = torch.compile(trained) if self.cfg.compile else trained
        self.offset_rng = torch.Generator().manual_seed(self.cfg.seed + 1)
        # progress
        self.step = self.epoch = self.batch_in_epoch = self.offset = 0
        self.train_chars = 0
        self.train_seconds = 0.0
        self.elapsed_before = 0.0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.bad_evals = 0
        self.hidden = None
        self.average = WeightAverage(self.model)
        if resume_from:
            with ckpt.restoring(resume_from):
                self._restore(resume_from)

    def _agree_on_run_dir(self) -> Path:
        """Rank 0 picks (and checks) the run directory; every process uses the same one."""
        chosen = [str(ckpt.new_run_dir(self.cfg.out, Path(self.cfg.corpus[0]).stem if self.cfg.corpus else "run")) if self.dist.is_main else None]
        if self.dist.enabled:
            import torch.distributed as dist

            dist.broadcast_object_list(chosen, src=0)
        return Path(chosen[0])

    # -- construction ---------------------------------------------------------------------------
    def _model_config(self, source: ckpt.Checkpoint | None, fine_tuning: bool = False) -> ModelConfig:
        if source is not None:
            if source.kind != "language-model":
                raise CharnnError(f"{source.path} is a {source.kind} checkpoint; {setting('init_from')} needs a "
                                  "language model")
            config = source.model_config()
            if fine_tuning:  # a new run may regularise the model differently, but keeps its architecture
                _refuse_architecture(self.given, config, self.cfg.init_from)
                config = replace(config, **{n: v for n, v in self.given.items() if n in FINE_TUNE_FIELDS})
            return config
        values = {name: getattr(self.cfg, name) for name in MODEL_FIELDS}
        return ModelConfig(vocab_size=len(self.corpus.vocab), **values)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict | None = None, **kwargs) -> "Trainer":
        """Continue a run exactly where its last checkpoint stopped; ``overrides`` may extend the budget.

        A run saved by N processes resumes on M processes (or one) with the same
        global batch: the per-process batch becomes global / (M x grad_accum).
        """
        kind = ckpt.run_kind(run_dir) or ckpt.load_checkpoint(run_dir, which="last").kind  # an ensemble has no last/
        if kind != "language-model":
            command = ckpt.RESUME_COMMANDS.get(kind)
            raise CharnnError(f"{run_dir} is a {kind} run, not a language model; "
                              + (f"resume it with {command} --resume {run_dir}" if command else "charnn train resumes "
                                 "only language-model runs"))
        source = ckpt.load_checkpoint(run_dir, which="last", with_train_state=True)
        source.model_config()  # a damaged config or vocabulary is named before the corpus is read and compared
        cfg = source.settings("training", _saved_config)
        if "average_last" not in source.config["training"]:
            cfg.average_last = 0.0  # a run from before weight averaging goes on as it started
        budget_before = (cfg.max_steps, cfg.max_epochs, cfg.time_budget)
        for key, value in (overrides or {}).items():
            if value is not None:
                setattr(cfg, key, value)
        if cfg.grad_accum is not None and cfg.grad_accum < 1:
            raise CharnnError(f"{setting('grad_accum')} must be at least 1, got {cfg.grad_accum}")
        cfg.init_from = None
        trainer = cls(cfg, resume_from=source, **kwargs)
        if (cfg.max_steps, cfg.max_epochs, cfg.time_budget) != budget_before:
            trainer.average.reset()  # a new budget has a new end to average over
            trainer.decay_decided = cfg.weight_decay_ramp is None  # and, with a ramp, its own weight decay
        return trainer

    def _restore(self, source: ckpt.Checkpoint) -> None:
        source.load_weights(self.model, self.device)
        st, tensors = source.train_state, source.train_tensors
        ckpt.restore_optimizer(self.optimizer, st["optimizer"], {k: v.to(self.device) for k, v in tensors.items()})
        self.schedule.load(st["schedule"])
        for name, value in ckpt.counters(st, ("step", "epoch", "batch_in_epoch", "offset", "train_chars",
                                               "bad_evals")).items():
            setattr(self, name, value)
        for name in ("train_seconds", "best_val", "last_val"):
            if not (is_number(st[name]) or st[name] is None and name != "train_seconds"):
                raise ValueError(f"{name} is {st[name]!r}, not a number")
            setattr(self, name, st[name])
        if self.offset >= self.cfg.seq_len or self.batch_in_epoch >= max(self.steps_per_epoch, 1):
            raise ValueError(f"the data position (offset {self.offset}, batch {self.batch_in_epoch}) lies outside "
                             f"an epoch of {self.steps_per_epoch} batches of {self.cfg.seq_len} characters")
        self.decay_decided = st.get("weight_decay_decided", True)  # the optimizer state holds the decay itself
        self.planned_epochs = st.get("planned_epochs")
        self.elapsed_before = st["elapsed"]
        own_rng = f"rng.torch.{self.rank}"
        torch.set_rng_state(tensors[own_rng] if own_rng in tensors else tensors["rng.torch.0"])
        self.offset_rng.set_state(tensors["rng.offsets"])
        for i, p in enumerate(self.average.params if st.get("averaged_steps", 0) else []):
            tensors.shaped(f"average.{i}", p.shape)
        self.average.load(st.get("averaged_steps", 0), tensors)
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        rows = slice(self.rank * self.batcher.rows_per_rank, (self.rank + 1) * self.batcher.rows_per_rank)
        shape = (self.model_config.layers, self.batcher.n_streams, self.model_config.hidden)
        hidden = [tensors.shaped(k, shape)[:, rows].to(self.device) for k in ("hidden.h", "hidden.c") if k in tensors]
        self.hidden = None if not hidden else tuple(hidden) if len(hidden) == 2 else hidden[0]
        if self.dist.is_main:
            ckpt.truncate_metrics(self.run_dir, self.step)

    # -- budget -------------------------------------------------------------------------------------
    def _planned_epochs(self) -> float:
        """Epochs the budget allows: from the step and epoch limits, and for a time limit from the pace so far."""
        cfg, limits = self.cfg, []
        if cfg.max_epochs:
            limits.append(cfg.max_epochs)
        if cfg.max_steps:
            limits.append(cfg.max_steps / max(self.steps_per_epoch, 1))
        if cfg.time_budget:
            epochs, seconds = self._epoch_progress(), self._elapsed()
            marked_epochs, marked_seconds = self._pace_mark
            pace = (epochs - marked_epochs) / max(seconds - marked_seconds, 1e-9)
            limits.append(epochs + pace * max(cfg.time_budget - seconds, 0.0))
        return min(limits, default=math.inf)

    def _follow_budget_with_decay(self) -> None:
        """With a weight-decay ramp, before each step: time the pace, and set the decay when it is due."""
        if self.cfg.weight_decay_ramp is None:
            return
        done = self.step - self._session_start  # steps of this session
        if done == PACE_SKIP_STEPS:
            self._pace_mark = (self._epoch_progress(), self._elapsed())
        if self._decay_due(done):
            self._decide_weight_decay()

    def _decay_due(self, done: int) -> bool:
        """Decide at the start; with a time budget, after warmup once the pace is known, then again at each epoch's
        start as the pace becomes surer (a CPU's speed drifts, and a session's first steps are slow)."""
        if not self.cfg.time_budget:
            return not self.decay_decided
        if not self.decay_decided:
            return done >= DECAY_DECISION_STEPS and self.step >= (self.cfg.warmup_steps or 0)
        return self.batch_in_epoch == 0 and done > PACE_SKIP_STEPS

    def _decide_weight_decay(self) -> None:
        planned = self._planned_epochs()
        if math.isfinite(planned):  # processes time slightly different paces: they use their mean
            planned = self.dist.sum([planned], self.device)[0] / self.world_size
        before = self.weight_decay if self.decay_decided else None
        self._set_weight_decay(ramped_weight_decay(self.cfg, planned))
        self.decay_decided = True
        self.planned_epochs = planned if math.isfinite(planned) else None  # None: no limit but early stopping
        if before is None or abs(self.weight_decay - before) > 1e-4:  # log the first decision and real changes
            self._log({"weight_decay": self.weight_decay, "planned_epochs": self.planned_epochs and round(planned, 2)})

    def _set_weight_decay(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["weight_decay"] = value

    @property
    def weight_decay(self) -> float:
        """The decay the optimizer applies now."""
        return self.optimizer.param_groups[0]["weight_decay"]

    # -- one step -------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.batcher.steps_per_epoch

    def _bar_text(self, loss: float, speed: float) -> str:
        val = f"{self.last_val:.3f}" if self.last_val is not None else "-"
        return f"loss {loss:.3f}, val bpc {val}, {speed:,.0f} chars/s"

    def _set_lr(self) -> float:
        lr = self.cfg.lr * self.schedule.factor(self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on this process's rows, in ``grad_accum`` micro-batches of ``batch_size`` rows.

        Returns the mean training loss (nats per character) over the global batch.
        """
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        k_steps, rows = self.cfg.grad_accum, self.cfg.batch_size
        carried, total = [], 0.0
        for k in range(k_steps):
            part = slice(k * rows, (k + 1) * rows)
            hidden = None if self.hidden is None else map_state(lambda t: t[:, part].detach(), self.hidden)
            last = k == k_steps - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with autocast(self.device, self.precision):
                    logits, hidden = self.step_fn(x[part], hidden)
                    loss = sequence_loss(logits, y[part]) / k_steps
                self.scaler.scale(loss).backward()
            carried.append(map_state(torch.Tensor.detach, hidden))
            total += float(loss.detach())
        self.hidden = carried[0] if k_steps == 1 else map_states(lambda *ts: torch.cat(ts, dim=1), carried)
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def validate(self) -> float | None:
        if len(self.corpus.val) < 2:
            return None
        with self.average.applied():
            nats, _ = evaluate(self.model, self.corpus.val, device=self.device, precision=self.precision,
                               seq_len=max(self.cfg.seq_len, 128), ctx=self.dist)
        return bits_per_char(nats)

    # -- checkpoints -------------------------------------------------------------------------------------
    def _config_dict(self) -> dict:
        return {
            "kind": "language-model",
            "charnn_version": _version(),
            "model": self.model_config.to_dict(),
            "training": self.cfg.to_dict(),
            "summary": {
                "step": self.step, "epoch": round(self._epoch_progress(), 4), "val_bpc": self.last_val,
                "best_val_bpc": self.best_val, "averaged_steps": self.average.count,
                "weight_decay": self.weight_decay, "train_chars": self.train_chars, "device": str(self.device),
                "precision": self.precision, "parameters": self.model.num_parameters(),
                "corpus_chars": self.corpus.n_chars, "elapsed": round(self._elapsed(), 2),
            },
        }

    def save(self, which: str) -> Path | None:
        """Write ``best`` (weights only) or ``last`` (with the full training state).

        Every process must call it (it gathers the carried state and RNG of all
        of them); only rank 0 writes.
        """
        train_state = tensors = None
        if which == "last":
            gathered = self._gathered_state()
            opt_json, tensors = ckpt.optimizer_state(self.optimizer)
            train_state = {
                "optimizer": opt_json, "schedule": self.schedule.state(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "offset": self.offset, "train_chars": self.train_chars,
                "train_seconds": self.train_seconds, "best_val": self.best_val, "last_val": self.last_val,
                "bad_evals": self.bad_evals, "elapsed": self._elapsed(),
                "global_streams": self.batcher.n_streams, "world_size": self.world_size,
                "averaged_steps": self.average.count, "weight_decay_decided": self.decay_decided,
                "planned_epochs": self.planned_epochs, "corpus_fingerprint": self.corpus_fingerprint,
            }
            tensors.update(gathered)
            tensors.update(self.average.state_tensors())
            tensors["rng.offsets"] = self.offset_rng.get_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state()
        if not self.dist.is_main:
            return None
        with self.average.applied() if which == "best" else contextlib.nullcontext():
            return ckpt.save_checkpoint(self.run_dir / which, model=self.model, vocab=self.corpus.vocab,
                                        config=self._config_dict(), train_state=train_state, train_tensors=tensors)

    def _gathered_state(self) -> dict[str, torch.Tensor]:
        """Every process's RNG state and carried hidden rows, in global stream order."""
        rng = self.dist.gather_rows(torch.get_rng_state()[None].to(self.device), dim=0).cpu()
        tensors = {f"rng.torch.{r}": rng[r] for r in range(self.world_size)}
        if self.hidden is not None:
            h = self.hidden if isinstance(self.hidden, tuple) else (self.hidden,)
            tensors.update({f"hidden.{n}": self.dist.gather_rows(t, dim=1) for n, t in zip("hc", h)})
        return tensors

    # -- logging -----------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        record = {"step": self.step, "epoch": round(self._epoch_progress(), 4), **record,
                  "elapsed": round(self._elapsed(), 3)}
        ckpt.append_metrics(self.run_dir, record)
        if self.on_log:
            self.on_log(record)

    def _unknown_text(self) -> str:
        """When fine-tuning: how much of the new corpus the model's vocabulary lacks (it reads as unknown)."""
        if not self.cfg.init_from or not len(self.corpus.train):
            return ""
        unknown = int(np.count_nonzero(self.corpus.train == UNK_ID))
        return (f"; {unknown:,} of them ({unknown / len(self.corpus.train):.2%}) unknown to the model's vocabulary"
                if unknown else "")

    def describe(self) -> str:
        c, m = self.cfg, self.model_config
        return (
            f"model: {m.layers}x{m.hidden} {m.cell.upper()}, embed {m.embed_dim or 'one-hot'}, "
            f"{self.model.num_parameters():,} parameters, vocabulary {len(self.corpus.vocab)}\n"
            f"data: {len(self.corpus.train):,} training / {len(self.corpus.val):,} validation chars; "
            f"batch {c.batch_size} x seq {c.seq_len}"
            + (f" x {c.grad_accum} accumulation" if c.grad_accum > 1 else "")
            + (f" x {self.world_size} processes" if self.world_size > 1 else "")
            + f", {self.steps_per_epoch} steps per epoch" + self._unknown_text() + "\n"
            f"device: {self.device} ({self.precision}), {torch.get_num_threads()} CPU threads; "
            f"{c.optimizer} lr {c.lr:g} ({c.schedule})" + _decay_text(c)
            + f", budget: {_budget_text(c, has_validation=len(self.corpus.val) >= 2)}\n"
            f"run directory: {self.run_dir}"
        )

    # -- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        try:
            result = self._fit()
        except TrainingInterrupted:
            shutdown()  # every rank stopped at the same step: they can still meet
            raise
        except BaseException:
            shutdown(synchronise=False)  # another rank may be gone: do not wait for it
            raise
        shutdown()
        return result

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        if self.dist.is_main:
            make_dirs(self.run_dir, f"the run directory ({setting('out')})")
        self.start_clock()
        self._session_start, self._pace_mark = self.step, (self._epoch_progress(), self._elapsed())
        eval_every = cfg.eval_every or max(self.steps_per_epoch, 1)
        bar = BudgetBar(self, disable=cfg.quiet or not self.dist.is_main)
        stop_reason = self.why_finished()  # a resumed run may have nothing left to train: no step past its end
        self.model.train()
        with StopSignals() as stop, bar:
            while stop_reason is None:
                if self.batch_in_epoch == 0:
                    self.offset = int(torch.randint(0, cfg.seq_len, (1,), generator=self.offset_rng))
                    self.hidden = None
                for x, y in self.batcher.batches(self.offset, self.batch_in_epoch):
                    self._follow_budget_with_decay()
                    lr = self._set_lr()
                    t0 = time.perf_counter()
                    loss = self.train_step(x, y)
                    self.train_seconds += time.perf_counter() - t0
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.train_chars += x.numel() * self.world_size
                    if self.batch_in_epoch == self.steps_per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    speed = self.train_chars / max(self.train_seconds, 1e-9)
                    if self.step % cfg.log_every == 0 or self.batch_in_epoch == 0:
                        loss_all = self.dist.sum([loss], self.device)[0] / self.world_size
                        self._log({"train_loss": round(loss_all, 5), "lr": lr, "chars_per_sec": round(speed)})
                    bar.update(self._bar_text(loss, speed))
                    interrupted, out_of_time, diverged, averaging = self.dist.any(
                        [stop.signum is not None, cfg.time_budget is not None and self._budget_spent() == "time",
                         not math.isfinite(loss), self._in_averaging_window()], self.device)
                    if averaging:  # every process agrees on the window, so their averages stay equal
                        self.average.update()
                    budget = self._budget_spent()
                    stop_reason = "diverged" if diverged else "time" if out_of_time else budget if budget != "time" else None
                    if diverged:  # the weights are not finite: keep the checkpoints saved before, write none
                        self._log({"diverged": True})
                        break
                    if self.step % eval_every == 0 or self.batch_in_epoch == 0 or stop_reason:
                        stop_reason = self._evaluate_and_save(stop_reason)
                        bar.update(self._bar_text(loss, speed))
                    if interrupted:
                        signum = stop.signum or signal.SIGTERM
                        self._log({"interrupted": signal.Signals(signum).name})
                        self.save("last")
                        raise TrainingInterrupted(self.run_dir, signum)
                    if stop_reason or self.batch_in_epoch == 0:
                        break
        if stop_reason == "diverged" and self.dist.is_main:
            ckpt.discard_run_without_checkpoint(self.run_dir)
        return TrainResult(self.run_dir, self.step, self._epoch_progress(), self.best_val, self.last_val,
                           self.train_chars / max(self.train_seconds, 1e-9), self._elapsed(), stop_reason,
                           self.weight_decay)

    def _in_averaging_window(self) -> bool:
        return bool(self.cfg.average_last) and self.progress() >= 1.0 - self.cfg.average_last

    def _evaluate_and_save(self, stop_reason: str | None) -> str | None:
        val = self.validate()
        if val is not None and not math.isfinite(val):  # the weights blew up: save nothing from them
            self._log({"val_bpc": None, "diverged": True})
            return "diverged"
        self.last_val = val
        improved = val is not None and (self.best_val is None or val < self.best_val)
        if val is not None:
            self.schedule.observe(val)
            self.bad_evals = 0 if improved else self.bad_evals + 1
            self.best_val = val if improved else self.best_val
            self._log({"val_bpc": round(val, 5), "best_val_bpc": round(self.best_val, 5),
                       **({"averaged_steps": self.average.count} if self.average.count else {})})
            if self.patience_spent() and not stop_reason:
                stop_reason = "early-stopping"
        if improved or val is None:
            self.save("best")
        self.save("last")
        return stop_reason


def map_state(fn, state):
    """Apply ``fn`` to the tensor(s) of a recurrent state: h, or (h, c) for an LSTM."""
    return tuple(fn(t) for t in state) if isinstance(state, tuple) else fn(state)


def map_states(fn, states: list):
    """Combine several states tensor by tensor, e.g. concatenating micro-batches."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states))
    return fn(*states)


def _decay_text(cfg: TrainConfig) -> str:
    if not cfg.weight_decay:
        return ""
    if cfg.weight_decay_ramp is None:
        return f", weight decay {cfg.weight_decay:g}"
    start, full = cfg.weight_decay_ramp
    return f", weight decay {cfg.weight_decay:g} if the budget allows {full:g} epochs (none up to {start:g}, linear between)"


def _budget_text(cfg: TrainConfig, has_validation: bool = True) -> str:
    parts = []
    if cfg.time_budget:
        parts.append(f"{cfg.time_budget:g} s")
    if cfg.max_steps:
        parts.append(f"{cfg.max_steps} steps")
    if cfg.max_epochs:
        parts.append(f"{cfg.max_epochs:g} epochs")
    if cfg.patience and has_validation:  # early stopping watches the validation loss
        parts.append(f"early stopping after {cfg.patience} evaluations without improvement")
    return ", ".join(parts) or "none"


def _version() -> str:
    from . import __version__

    return __version__


def train(cfg: TrainConfig, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a new model (or fine-tune one with ``cfg.init_from``) and return the result.

    Training draws from its own seed (``cfg.seed``); the caller's PyTorch random state is as it was afterwards.
    """
    with caller_rng_kept():
        return Trainer(cfg, on_log=on_log).fit()


@contextlib.contextmanager
def caller_rng_kept():
    """Run a block that seeds PyTorch's global generators (CPU and initialized CUDA devices) and put the
    caller's random state back afterwards, so that fitting a model does not reset the user's own draws."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield
