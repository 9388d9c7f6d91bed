"""Checkpoints: safetensors weights plus JSON config and vocabulary, written atomically.

A training run is a directory::

    RUN/
      best/   model.safetensors  config.json  vocab.json            (lowest validation loss)
      last/   the same + train_state.safetensors train_state.json   (exact resume)
      metrics.jsonl                                                  (one JSON object per log line)

Nothing is unpickled on load: tensors come from safetensors and everything
else from JSON, so a checkpoint from an untrusted source cannot run code.
A checkpoint directory is first written under a temporary name and then
renamed into place, so a crash never leaves a half-written ``best`` or ``last``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import CharnnError, check_creatable, is_integer, is_number, make_dirs, setting
from .model import ModelConfig
from .vocab import Vocabulary

FORMAT = "charnn-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
TRAIN_TENSORS, TRAIN_JSON = "train_state.safetensors", "train_state.json"
METRICS = "metrics.jsonl"
RUN_CHECKPOINTS = ("best", "last", ".best.old", ".last.old")  # a run directory's checkpoints
CHECKPOINT_FILES = frozenset({WEIGHTS, CONFIG, VOCAB, TRAIN_TENSORS, TRAIN_JSON})
# The command that trains (and resumes) a run of each checkpoint kind.
RESUME_COMMANDS = {"language-model": "charnn train", "classifier": "charnn classify train"}
DEFAULT_ROOT = Path("checkpoints")


def new_run_dir(out: str | Path | None, stem: str) -> Path:
    """The directory for a new run: ``out`` if it is empty or absent, else ``checkpoints/STEM-TIME``.

    An ``out`` that already holds files is refused: a new run never overwrites an earlier one.
    """
    if out:
        run_dir = Path(out)
        if run_dir.exists() and not run_dir.is_dir():
            raise CharnnError(f"{run_dir} is a file, not a run directory; choose another {setting('out')}")
        if run_dir.exists() and any(run_dir.iterdir()):
            kind = run_kind(run_dir)
            if kind in RESUME_COMMANDS:
                raise CharnnError(f"{run_dir} already holds a {kind} run; resume it with {RESUME_COMMANDS[kind]} "
                                  f"--resume {run_dir}, or choose another {setting('out')}")
            raise CharnnError(f"{run_dir} already holds files; choose another {setting('out')} (a new or empty directory)")
        check_creatable(run_dir, f"the run directory ({setting('out')})")  # before any line describes the run
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = DEFAULT_ROOT / f"{stem}-{stamp}", 1
    while run_dir.exists():
        n += 1
        run_dir = DEFAULT_ROOT / f"{stem}-{stamp}-{n}"
    return run_dir


def run_kind(run_dir: str | Path) -> str | None:
    """The kind ("language-model", "classifier") of the run in ``run_dir``, from its newest checkpoint's config
    (an ensemble's from its first member's); None where it holds no readable checkpoint."""
    run_dir = Path(run_dir)
    for sub in ("last", "best", ".last.old", ".best.old", "member-1/last", "member-1/best"):
        config = run_dir / sub / CONFIG
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return data.get("kind", "language-model")
    return None


@dataclass
class Checkpoint:
    """A loaded checkpoint: its JSON config, vocabulary and (optionally) training state."""

    path: Path
    config: dict
    vocab: Vocabulary
    train_state: dict | None = None
    train_tensors: dict[str, torch.Tensor] | None = None

    @property
    def kind(self) -> str:
        return self.config.get("kind", "language-model")

    def settings(self, section: str, read):
        """``read(config[section])``: settings read from a section of config.json; a section missing or damaged
        (a wrong type, a value out of range) is a CharnnError naming the file."""
        try:
            return read(self.config[section])
        except (KeyError, TypeError, AttributeError, ValueError, CharnnError) as e:
            raise CharnnError(f"{self.path / CONFIG} is damaged ({section} settings: {e}); use another checkpoint") from None

    def model_config(self) -> ModelConfig:
        """The saved model's settings, checked against the vocabulary (a damaged config.json is a CharnnError)."""
        config = self.settings("model", ModelConfig.from_dict)
        if config.vocab_size != len(self.vocab):
            raise CharnnError(f"{self.path}: the vocabulary ({len(self.vocab)}) does not match the model "
                              f"({config.vocab_size}); the checkpoint is damaged")
        return config

    def check_weights(self) -> None:
        """A cheap check of the weights file: its safetensors header must parse and cover exactly the whole file,
        so a truncated, padded or overwritten file is caught without reading any tensor."""
        try:
            with safe_open(str(self.path / WEIGHTS), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise CharnnError(f"{self.path / WEIGHTS} is damaged ({e}); use another checkpoint") from e

    def load_weights(self, module: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        """Copy the saved weights into ``module`` (which must have the saved architecture)."""
        try:
            missing, unexpected = load_model(module, str(self.path / WEIGHTS), strict=False, device=str(device))
        except (SafetensorError, OSError, RuntimeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # torch lists every tensor
            detail = next((line for line in lines if "mismatch" in line), lines[0] if lines else type(e).__name__)
            raise CharnnError(f"{self.path / WEIGHTS} is damaged or does not match its config ({detail}); "
                              "use another checkpoint") from e
        if missing or unexpected:
            raise CharnnError(
                f"{self.path / WEIGHTS} does not match its config (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); the checkpoint is damaged"
            )
        if not all(bool(t.isfinite().all()) for t in module.state_dict().values() if t.is_floating_point()):
            raise CharnnError(f"{self.path / WEIGHTS} holds weights that are not finite (NaN or infinity); "
                              "the checkpoint is damaged, use another one")


# -- writing -------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    vocab: Vocabulary,
    config: dict,
    train_state: dict | None = None,
    train_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write a checkpoint directory at ``directory``.

    ``directory`` may be absent, an empty directory or an earlier checkpoint directory (which is replaced);
    anything else (a file, a run directory, a folder of other files) is refused with nothing touched.
    """
    target = Path(directory)
    _check_replaceable(target)
    make_dirs(target.parent, "the checkpoint")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        full_config = {"format": FORMAT, "format_version": FORMAT_VERSION, "saved_at": time.time(), **config}
        save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        _write_json(tmp / CONFIG, full_config)
        _write_json(tmp / VOCAB, vocab.to_dict())
        if train_state is not None:
            _write_json(tmp / TRAIN_JSON, train_state)
            save_file({k: v.detach().cpu().contiguous() for k, v in (train_tensors or {}).items()}, str(tmp / TRAIN_TENSORS))
        _share_like_json(tmp)
        _fsync_dir_files(tmp)
        _swap_into_place(tmp, target)
    except SafetensorError as e:  # safetensors' own error for a failed write (a full disk, say)
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(errno.EIO, f"cannot write {target}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _share_like_json(directory: Path) -> None:
    """Give the safetensors files the JSON files' permissions (safetensors writes its files readable by their owner
    only, whatever the umask, so others who may read the config could not load the weights)."""
    mode = (directory / CONFIG).stat().st_mode & 0o777
    for f in directory.glob("*.safetensors"):
        f.chmod(mode)


def _fsync_dir_files(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _check_replaceable(target: Path) -> None:
    """Refuse to write a checkpoint over anything but an empty directory or an earlier checkpoint directory."""
    if target.is_symlink():
        raise CharnnError(f"{target} is a link, not a checkpoint directory; save to a new or empty directory")
    if target.exists() and not target.is_dir():
        raise CharnnError(f"{target} is a file, not a checkpoint directory; save to a new or empty directory")
    if not target.exists():
        return
    entries = {p.name for p in target.iterdir()}
    if entries and not (is_checkpoint_dir(target) and entries <= CHECKPOINT_FILES):
        raise CharnnError(f"{target} already holds other files (it is not a checkpoint directory); save to a new "
                          f"or empty directory, or move those files away first")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; at every instant one complete copy exists on disk.

    ``target``, if it exists, is deleted: :func:`save_checkpoint` has checked it is a checkpoint directory or empty.
    """
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one record to the run's metrics (a number that is not finite is written as null: valid JSON)."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def discard_run_without_checkpoint(run_dir: str | Path) -> None:
    """Remove a run directory that holds no checkpoint (only its metrics), so that a run which failed before
    saving anything neither blocks its --out nor becomes the latest run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(is_checkpoint_dir(run_dir / which) for which in ("best", "last")):
        return
    (run_dir / METRICS).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only when nothing else is left in it


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # a damaged line is skipped below
    except OSError as e:
        raise CharnnError(f"cannot read {path} ({e.strerror or e}); move it aside (it should be the run's metrics file)") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if _is_metrics_record(record):  # anything else is not a record charnn wrote
            records.append(record)
    return records


# fields charnn always writes as numbers (or null, for a value that was not finite)
NUMERIC_METRICS = ("step", "epoch", "elapsed", "lr", "chars_per_sec", "train_loss", "val_loss", "val_bpc", "best_val_bpc",
                   "val_accuracy", "val_macro_f1", "cv_log_loss")


def _is_metrics_record(record: Any) -> bool:
    """Whether a parsed line has the shape charnn writes: an object whose numeric fields hold numbers or null."""
    if not isinstance(record, dict):
        return False
    return all(record.get(key) is None or is_number(record[key]) for key in NUMERIC_METRICS)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, so a crash leaves the old file or the new."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    _write_json(tmp, data)
    os.replace(tmp, path)


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (they are replayed when a run resumes), and the half-written
    checkpoints (``.last.tmp-*``) of a process killed while saving."""
    for unfinished in Path(run_dir).glob(".*.tmp-*"):
        shutil.rmtree(unfinished, ignore_errors=True)
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


# -- finding and reading -------------------------------------------------------------------
def is_checkpoint_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path | None = None, which: str = "best", root: str | Path = DEFAULT_ROOT,
                       kind: str | None = None) -> Path:
    """Turn a run directory, a checkpoint directory or None (the latest run, of ``kind`` if given) into a
    checkpoint directory."""
    if which not in ("best", "last"):
        raise CharnnError(f"which must be 'best' or 'last', got {which!r}")
    if path is None:
        path = latest_run(root, kind)
    p = Path(path)
    if not p.exists():
        raise CharnnError(f"checkpoint {p} not found; pass a run directory or a checkpoint directory")
    if is_checkpoint_dir(p):
        return p
    if which == "last" and (p / "member-1").is_dir() and not is_checkpoint_dir(p / "last"):
        raise CharnnError(f"{p} is an ensemble run: it keeps its members' best models together and no last model; "
                          f"use its best, or pass {p / 'member-1'} (or another member-N) for one member's last model")
    for name in (which, "last" if which == "best" else "best"):
        for candidate in (p / name, p / f".{name}.old"):
            if is_checkpoint_dir(candidate):
                return candidate
    if (p / "member-1").is_dir():
        raise CharnnError(f"{p} is an unfinished ensemble run (it has no ensemble until every member has trained); "
                          f"resume it with charnn classify train --resume {p}, or pass {p / 'member-1'} (or another "
                          "member-N) for one member")
    raise CharnnError(
        f"{p} is not a charnn checkpoint (no {CONFIG} and {WEIGHTS}); pass a run directory or a checkpoint directory"
    )


def latest_run(root: str | Path = DEFAULT_ROOT, kind: str | None = None) -> Path:
    """The run directory under ``root`` with the newest checkpoint; with ``kind`` ("language-model",
    "classifier"), the newest run of that kind (sampling must not pick up a classifier trained since)."""
    root = Path(root)
    runs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")] if root.is_dir() else []
    stamps = {d: _newest_checkpoint_time(d) for d in runs}
    stamps = {d: t for d, t in stamps.items() if t is not None and (kind is None or run_kind(d) == kind)}
    if not stamps:
        what, command = ("classifier", "charnn classify train") if kind == "classifier" else (
            "language model" if kind else "trained model", "charnn train")
        raise CharnnError(f"no {what} under {root}/; train one with {command}, or pass a checkpoint path")
    return max(stamps, key=stamps.get)


def run_of(checkpoint_dir: Path) -> Path | None:
    """The run directory a checkpoint belongs to (its metrics.jsonl is there); None for a checkpoint saved on its
    own (``TextClassifier.save``), whose parent folder is no run."""
    return checkpoint_dir.parent if checkpoint_dir.name in RUN_CHECKPOINTS else None


def _newest_checkpoint_time(run_dir: Path) -> float | None:
    """When the run's newest complete checkpoint was written (None: it has none)."""
    times = [(run_dir / n / CONFIG).stat().st_mtime for n in ("best", "last", ".best.old", ".last.old")
             if is_checkpoint_dir(run_dir / n)]
    return max(times, default=None)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CharnnError(f"{path} is missing; the checkpoint is incomplete, use another one") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CharnnError(f"{path} is damaged ({e}); use another checkpoint") from e
    if not isinstance(data, dict):
        raise CharnnError(f"{path} is damaged (not a JSON object); use another checkpoint")
    return data


class DamagedTensors(Exception):
    """A training-state tensor that is missing or misshapen; :func:`restoring` names the tensors file."""


class TrainTensors(dict):
    """A training state's tensors by name: a missing one is a :class:`DamagedTensors` error."""

    def __missing__(self, name: str):
        raise DamagedTensors(f"no tensor {name!r}")

    def shaped(self, name: str, shape) -> torch.Tensor:
        """The tensor ``name``, which must have ``shape``."""
        return _check_shape(name, self[name], shape)


def _check_shape(name: str, tensor: torch.Tensor, shape) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise DamagedTensors(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor


def counters(state: dict, names) -> dict:
    """The training state's ``names``, each a whole number of at least 0 (a ValueError, inside :func:`restoring`,
    for anything else)."""
    for name in names:
        if not is_integer(state[name]) or state[name] < 0:
            raise ValueError(f"{name} is {state[name]!r}, not a count")
    return {name: state[name] for name in names}


@contextlib.contextmanager
def restoring(source: "Checkpoint"):
    """Inside the block, a training state with missing or mistyped entries (a damaged or hand-edited
    ``train_state.json`` or ``train_state.safetensors``) is a CharnnError naming the file, not a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:  # the device is full, the files may be fine
        raise
    except (DamagedTensors, RuntimeError) as e:  # torch's other errors here come from the saved tensors
        raise CharnnError(f"{source.path / TRAIN_TENSORS} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          "this run cannot resume, but its best model can start a new one (--init-from)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CharnnError(f"{source.path / TRAIN_JSON} is damaged ({type(e).__name__}: {e}); this run cannot resume, "
                          "but its best model can start a new one (--init-from)") from None


def load_checkpoint(path: str | Path | None = None, *, which: str = "best", with_train_state: bool = False,
                    kind: str | None = None) -> Checkpoint:
    """Read a checkpoint's config and vocabulary (weights are loaded by ``Checkpoint.load_weights``); ``path``
    None reads the latest run (of ``kind`` if given)."""
    directory = resolve_checkpoint(path, which, kind=kind)
    config = _read_json(directory / CONFIG)
    if config.get("format") != FORMAT:
        raise CharnnError(f"{directory / CONFIG} is not a charnn checkpoint config; pass a run directory or a checkpoint directory")
    version = config.get("format_version", 0)
    if not is_integer(version) or version < 0:
        raise CharnnError(f"{directory / CONFIG} is damaged (format_version {version!r} is not a version number); "
                          "use another checkpoint")
    if version > FORMAT_VERSION:
        raise CharnnError(f"{directory} was written by a newer charnn (format {version}); upgrade charnn")
    vocab_data = _read_json(directory / VOCAB)
    try:
        vocab = Vocabulary.from_dict(vocab_data)
    except CharnnError as e:
        raise CharnnError(f"{directory / VOCAB} is damaged ({e.__cause__ or e}); use another checkpoint") from None
    ckpt = Checkpoint(directory, config, vocab)
    if with_train_state:
        if not (directory / TRAIN_JSON).is_file():
            raise CharnnError(f"{directory} has no training state to resume from; pass the run's directory (its last/ checkpoint)")
        ckpt.train_state = _read_json(directory / TRAIN_JSON)
        try:
            ckpt.train_tensors = TrainTensors(load_file(str(directory / TRAIN_TENSORS)))
        except (SafetensorError, OSError) as e:
            raise CharnnError(f"{directory / TRAIN_TENSORS} is damaged ({e}); resume from another checkpoint") from e
    return ckpt


# -- optimizer and RNG state without pickle ----------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split an optimizer state dict into JSON-able data and named tensors."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, data: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Load what :func:`optimizer_state` saved; a tensor that does not fit its parameter is a DamagedTensors error."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            if not 0 <= int(pid) < len(params):
                raise DamagedTensors(f"tensor {name!r} belongs to no parameter")
            state.setdefault(int(pid), {})[key] = value if value.dim() == 0 else _check_shape(name, value, params[int(pid)].shape)
    for name, value in data.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": data["param_groups"]})
