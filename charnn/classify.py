"""Text classification with the character encoder (many-to-one).

The encoder is a language model's embedding and recurrent stack: it reads a
whole text, its outputs are pooled over time (last state, mean, max or all
three), and a dropout + linear head gives one score per class. Trained from
scratch, or fine-tuned from a ``charnn train`` checkpoint (``init_from``) with
discriminative learning rates and gradual unfreezing, so a few hundred labels
are enough.

* :func:`read_labelled` reads CSV, TSV, JSONL (columns by name) or a folder
  with one subfolder of text files per label.
* :class:`ClassifierTrainer` is the training loop behind ``charnn classify
  train``: length-bucketed batches of packed sequences, early stopping on
  validation macro-F1, ``best/`` and ``last/`` checkpoints, exact resume and
  Ctrl-C handling like ``charnn train``.
* :class:`EnsembleTrainer` trains several members (other initialisations
  and batch orders, the same data and validation split) whose predicted
  probabilities :class:`ClassifierEnsemble` averages (``--ensemble N``).
* :class:`TextClassifier` wraps it with scikit-learn's conventions
  (``fit``/``predict``/``predict_proba``/``score``, ``get_params``), without
  needing scikit-learn installed.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import io
import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import checkpoint as ckpt
from .budget import BudgetBar, BudgetClock
from .data import check_listable, read_text
from .devices import autocast, pick_device, pick_precision
from .errors import SEED_LIMIT, CharnnError, check_settings, make_dirs, off_value, setting
from .model import (CELLS, CharRNN, Dropout, ModelConfig, fits_in_memory, init_recurrent, run_layers,
                    run_recurrent)
from .probe import fit_count as probe_fit_count, fit_probe
from .training import (OPTIMIZERS, SCHEDULES, LRSchedule, StopSignals, TrainingInterrupted, as_absolute_path, as_path,
                       as_path_list, caller_rng_kept, check_types, make_optimizer)
from .vocab import Vocabulary, training_vocabulary

KIND = "classifier"
POOLINGS = ("last", "mean", "max", "concat")
POOL_LAYERS = ("top", "all")  # the head reads the top layer, or every layer (ELMo-style)
FRAME = "\n"  # --newline-frame: a text is read between newlines, as a line of a language model's corpus
TRUNCATIONS = ("head", "tail", "both")
THRESHOLD = 0.5  # multi-label: a class is predicted when its probability reaches this
MIN_CROP_CHARS = 10  # --random-crop keeps at least this many characters, and leaves shorter texts whole
CROP_STREAM = 0x63726F70  # keeps the crops' random numbers apart from the seed's other uses
FINE_TUNE_LR_DECAY = 2.6  # ULMFiT: each layer down learns 2.6 times slower
# Fine-tuning with fewer steps per epoch than this trains the head only (a linear probe, fitted as an
# L2-regularised logistic regression by charnn.probe). Gradual unfreezing frees one layer group per epoch;
# on a few hundred texts an epoch is a handful of steps, so the whole encoder is free before the head has
# learnt anything and over-fits the labels. Measured on the development split (benchmarks/RESULTS.md):
# on SMS at 10, 50 and 200 texts per class (1, 3 and 12 steps per epoch) the probe scored 0.02-0.09
# macro-F1 higher, and on names at 50 per class (29 steps) 0.006 higher; on names at 200 per class
# (92 steps) and with all labels fine-tuning did better.
PROBE_BELOW_STEPS_PER_EPOCH = 32
BUCKET_BATCHES = 50  # training batches are cut from shuffled chunks of this many batches, sorted by length
PREDICT_BATCH = 256
RESUME_OVERRIDES = ("max_epochs", "max_steps", "time_budget", "device", "quiet")  # settings a resumed run may change
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class InvalidInput(CharnnError, ValueError):
    """Texts or labels the classifier cannot use (a ``ValueError`` too, as scikit-learn expects)."""


# -- reading labelled data ------------------------------------------------------------------------
@dataclass
class LabelledData:
    """Texts and their labels (a string each; a tuple of strings each when multi-label)."""

    texts: list[str]
    labels: list
    source: str


def read_labelled(path: str | Path, *, text_col: str = "text", label_col: str = "label", multi_label: bool = False,
                  label_sep: str = "|", encoding: str = "utf-8") -> LabelledData:
    """Read CSV, TSV, JSONL (columns by name) or a folder of per-label subfolders of text files.

    TSV has no quoting (a field runs to the next tab); CSV uses standard quoting.
    With ``multi_label`` a CSV/TSV label field holds labels separated by
    ``label_sep`` and a JSONL label may be a list.
    """
    p = Path(path)
    if p.is_dir():
        data = _read_folders(p, encoding)
    elif not p.is_file():
        raise CharnnError(f"{p}: no such file or directory; check the path")
    else:
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise CharnnError(f"cannot tell the format of {p}; use a .csv, .tsv or .jsonl file, "
                              "or a folder with one subfolder of text files per label")
        text = read_text(p, encoding)
        rows = _jsonl_rows(p, text) if fmt == "jsonl" else _table_rows(p, text, fmt)
        data = _pick_columns(p, rows, text_col, label_col)
    labels = [_parse_label(where, value, multi_label, label_sep) for where, value in data.labels]
    return LabelledData(data.texts, labels, str(p))


@dataclass
class _Rows:
    columns: list[str]
    rows: list[tuple[str, dict]]  # (where, record)


@dataclass
class _Raw:
    texts: list[str]
    labels: list[tuple[str, object]]  # (where, raw label)


DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}


def _csv_delimiter(text: str) -> str:
    """A .csv file's delimiter: a comma, or a semicolon or tab where the header line has those and no comma
    (spreadsheets in locales with a decimal comma save CSV with semicolons)."""
    header = text.split("\n", 1)[0]
    return next((d for d in DELIMITERS if d in header), ",")


def _table_rows(path: Path, text: str, fmt: str) -> _Rows:
    lines = io.StringIO(text, newline="")
    delimiter = "\t" if fmt == "tsv" else _csv_delimiter(text)
    # strict: a quote left open (or closed mid-field) is an error, not the rows after it swallowed into one text
    reader = (csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE) if fmt == "tsv"
              else csv.reader(lines, delimiter=delimiter, strict=True))
    start = 1  # the line where the record being read starts (a quoted field may span lines)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise CharnnError(f"{path} is empty or has no header row; its first line must name the columns")
        header = [h.strip() for h in header]  # (read_text has dropped a byte-order mark)
        rows, start = [], reader.line_num + 1
        for record in reader:
            where, start = f"{path} line {start}", reader.line_num + 1
            if not any(field.strip() for field in record):
                continue  # blank line
            if len(record) > len(header):
                raise CharnnError(f"{where} has {len(record)} fields but the header names {len(header)}; "
                                  f"check the delimiter ({DELIMITERS[delimiter]}) and quoting")
            rows.append((where, dict(zip(header, record))))
    except csv.Error as e:
        raise CharnnError(f"{path} line {start} is not valid {fmt.upper()} ({e} at line {reader.line_num}); fix the "
                          'quoting: a field that starts with " ends with " (write a quote inside it as "")') from e
    return _Rows(header, rows)


def _jsonl_rows(path: Path, text: str) -> _Rows:
    rows, columns = [], {}
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028 and \x85
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CharnnError(f"{path} line {n} is not valid JSON ({e.msg}); write one JSON object per line") from e
        if not isinstance(record, dict):
            raise CharnnError(f"{path} line {n} is not a JSON object; write one object per line, e.g. "
                              '{"text": "...", "label": "..."}')
        columns.update(dict.fromkeys(record))
        rows.append((f"{path} line {n}", record))
    return _Rows(list(columns), rows)


def _pick_columns(path: Path, table: _Rows, text_col: str, label_col: str) -> _Raw:
    if text_col == label_col:
        raise CharnnError(f"{setting('text_col')} and {setting('label_col')} both name {text_col!r}; the texts and the "
                          "labels must be different columns")
    if not table.rows:
        raise CharnnError(f"{path} holds no examples; it needs a header and at least one row")
    for col in (text_col, label_col):
        if table.columns.count(col) > 1:
            raise CharnnError(f"{path}: the header names column {col!r} {table.columns.count(col)} times; "
                              "rename the copies so each column name is unique")
    for col, option in ((text_col, setting("text_col")), (label_col, setting("label_col"))):
        if col not in table.columns:
            raise CharnnError(f"{path} has no column {col!r} (columns: {', '.join(map(str, table.columns))}); "
                              f"name the right one with {option}")
    texts, labels = [], []
    for where, record in table.rows:
        text = record.get(text_col)
        if text is None:
            raise CharnnError(f"{where} has no {text_col!r} value; every row needs a text")
        if not isinstance(text, str):
            raise CharnnError(f"{where}: the {text_col!r} value is not a string; texts must be strings")
        if not text.strip():
            raise CharnnError(f"{where}: the text is empty; remove the row or give it a text")
        texts.append(text)
        labels.append((where, record.get(label_col)))
    return _Raw(texts, labels)


def _read_folders(root: Path, encoding: str) -> _Raw:
    check_listable(root, recursive=True)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise CharnnError(f"{root} has no subfolders; put each label's text files in a subfolder named after the label")
    texts, labels = [], []
    for folder in folders:
        files = sorted(f for f in folder.rglob("*")  # hidden files and all under hidden folders (.git...) are skipped
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))
        for f in files:
            # the newline that ends a file's last line is no more part of the text than of a line given to predict
            text = read_text(f, encoding).rstrip("\n")
            if not text.strip():
                raise CharnnError(f"{f} is empty; remove it or give it a text")
            texts.append(text)
            labels.append((str(f), folder.name))
    if not texts:
        raise CharnnError(f"the subfolders of {root} hold no files; put one text file per example in them")
    return _Raw(texts, labels)


def _parse_label(where: str, value, multi_label: bool, sep: str):
    if multi_label:
        if value is None:
            return ()
        items = value if isinstance(value, list) else _label_text(where, value).split(sep) if sep else [value]
        labels = (_label_text(where, v).strip() for v in items if v is not None)  # a null in a list is no label
        return tuple(sorted({label for label in labels if label}))
    if isinstance(value, (list, dict)):
        raise CharnnError(f"{where}: the label is a {type(value).__name__}; for several labels per text pass "
                          f"{setting('multi_label', True)}")
    label = "" if value is None else _label_text(where, value).strip()
    if not label:
        raise CharnnError(f"{where}: the label is empty; every example needs a label")
    return label


def _label_text(where: str, value) -> str:
    """One label read from a file, as text: a JSON number or boolean as JSON writes it (``true``, not ``True``)."""
    if isinstance(value, (list, dict)):
        raise CharnnError(f"{where}: a label is a {type(value).__name__}; give labels as strings (several: a list "
                          "of strings)")
    return value if isinstance(value, str) else json.dumps(value)


# -- labels and splits ------------------------------------------------------------------------------
UNSEEN_AT_EVAL = ("labels the model was not trained on", "evaluate on data with the training labels, "
                  "or retrain with these labels")
UNSEEN_IN_VAL = ("validation labels that the training data lacks", "every validation label must occur in "
                 "the training data; move those examples into the training data or drop them")


def encode_labels(labels, multi_label: bool, classes: np.ndarray | None = None,
                  unseen: tuple[str, str] = UNSEEN_AT_EVAL) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, y)``: y holds class indices, or a 0/1 matrix when ``multi_label``.

    Given ``classes`` (a trained model's), labels outside them are an error, worded by ``unseen``
    (what they are, and the fix).
    """
    if labels is None:
        raise InvalidInput("this classifier requires y to be passed, but the target y is None; give one label per text")
    if multi_label:
        arr = labels if isinstance(labels, np.ndarray) else None
        if arr is not None and arr.ndim == 2 and arr.dtype.kind in "biuf":
            if classes is None:
                classes = np.arange(arr.shape[1])
            if arr.shape[1] != len(classes):
                raise InvalidInput(f"the label matrix has {arr.shape[1]} columns but the model knows {len(classes)} classes")
            return classes, (arr > 0).astype(np.float32)
        sets = [(label,) if isinstance(label, str) or np.ndim(label) == 0 else tuple(label) for label in labels]
        seen = sorted({x for s in sets for x in s}, key=_sort_key)
        if classes is None:
            classes = _class_array(seen)
        _check_known(seen, classes, unseen)
        index = {c: i for i, c in enumerate(classes.tolist())}
        y = np.zeros((len(sets), len(classes)), np.float32)
        for row, s in enumerate(sets):
            y[row, [index[_py(x)] for x in s]] = 1.0
        return classes, y
    arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    if arr.ndim == 1 and any(isinstance(v, float) and not float(v).is_integer() for v in arr.tolist()):
        raise InvalidInput("Unknown label type: continuous (or NaN/infinite) labels; a classifier needs class "
                           "labels such as strings or integers")
    if arr.ndim != 1:
        raise InvalidInput(f"labels must be one per text (a 1-D sequence), got shape {arr.shape}; "
                          f"for several labels per text use {setting('multi_label', True)}")
    values = [_py(v) for v in arr.tolist()]
    if None in values:
        raise InvalidInput(f"label {values.index(None)} (counting from 0) is None; give every text a label")
    seen = sorted(set(values), key=_sort_key)
    if classes is None:
        classes = _class_array(seen)
    _check_known(seen, classes, unseen)
    index = {c: i for i, c in enumerate(classes.tolist())}
    return classes, np.array([index[v] for v in values], dtype=np.int64)


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


def _sort_key(value):
    return (type(value).__name__, value)


def _class_array(values: list) -> np.ndarray:
    """The labels as an array: typed when that keeps every label as it is, else of objects ([1, 'a'] stays so)."""
    arr = np.array(values)
    return arr if arr.dtype.kind in "biufUS" and arr.tolist() == values else np.array(values, dtype=object)


def _check_known(seen: list, classes: np.ndarray, wording: tuple[str, str]) -> None:
    known = classes.tolist()
    known_set = set(known)
    unseen = [v for v in seen if v not in known_set]
    if unseen:
        what, fix = wording
        shown = ", ".join(repr(v) for v in unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise InvalidInput(f"{what}: {shown} (the training labels, {len(known)}: "
                          f"{', '.join(map(repr, known[:8]))}{' ...' if len(known) > 8 else ''}); {fix}")


def stratified_split(keys: Sequence, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices; every label keeps about ``val_fraction`` of its examples aside.

    A label with two or more examples gives at least one to validation and keeps
    at least one for training; a label seen once stays in training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CharnnError(f"{setting('val_fraction')} must be in [0, 1), got {val_fraction}")
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for members in groups.values():
        order = rng.permutation(np.asarray(members))
        n_val = 0
        if val_fraction > 0 and len(order) >= 2:
            n_val = min(max(int(round(len(order) * val_fraction)), 1), len(order) - 1)
        val.extend(order[:n_val].tolist())
        train.extend(order[n_val:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def _split_keys(y: np.ndarray) -> list:
    return [tuple(np.nonzero(row)[0]) for row in y] if y.ndim == 2 else y.tolist()


# -- texts to ids ---------------------------------------------------------------------------------------
def check_texts(texts) -> list[str]:
    """The texts as a list of non-empty strings, or a clear error."""
    if isinstance(texts, str):
        raise InvalidInput("pass a list of texts, not a single string (wrap it: [text])")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"text {i} (counting from 0) is {t!r:.40}, not a string; a text classifier reads "
                               "strings")
        if not t:
            raise InvalidInput(f"text {i} (counting from 0) is empty; every text needs at least one character")
    return texts


def truncate(text: str, max_chars: int | None, keep: str = "head") -> str:
    """Shorten ``text`` to ``max_chars``, keeping its head, its tail, or half of each (``both``)."""
    if not max_chars or len(text) <= max_chars:
        return text
    if keep == "head":
        return text[:max_chars]
    if keep == "tail":
        return text[-max_chars:]
    head = (max_chars + 1) // 2
    return text[:head] + text[len(text) - (max_chars - head):]


def encode_texts(texts: Sequence[str], vocab: Vocabulary, max_chars: int | None, keep: str,
                 frame: str = "") -> list[np.ndarray]:
    """Character ids of each text, truncated to ``max_chars`` and then put between ``frame`` strings."""
    return [vocab.encode(frame + truncate(t, max_chars, keep) + frame) for t in texts]


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Index batches of similar-length texts, so padding is short.

    Without ``rng``: all texts sorted by length (inference). With it: shuffled,
    sorted within chunks of ``BUCKET_BATCHES`` batches, batch order shuffled.
    """
    n = len(lengths)
    if rng is None:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    perm = rng.permutation(n)
    batches = []
    chunk = batch_size * BUCKET_BATCHES
    for s in range(0, n, chunk):
        part = perm[s:s + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def random_crops(batch: Sequence[np.ndarray], prob: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``batch`` with each text, with probability ``prob``, replaced by a random contiguous window of 50-100% of its
    characters (at least ``MIN_CROP_CHARS``): augmentation that makes the classifier use every cue in a text,
    not only its most salient one."""
    out = []
    for ids in batch:
        n = len(ids)
        if n > MIN_CROP_CHARS and rng.random() < prob:
            length = int(rng.integers(max(MIN_CROP_CHARS, n // 2), n + 1))
            start = int(rng.integers(0, n - length + 1))
            ids = ids[start:start + length]
        out.append(ids)
    return out


def collate(encoded: Sequence[np.ndarray], idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (batch, longest) and lengths of the texts ``idx``."""
    lengths = np.array([len(encoded[i]) for i in idx], dtype=np.int64)
    ids = np.zeros((len(idx), int(lengths.max())), dtype=np.int64)
    for row, i in enumerate(idx):
        ids[row, :lengths[row]] = encoded[i]
    return torch.from_numpy(ids), torch.from_numpy(lengths)


# -- the network --------------------------------------------------------------------------------------------
class ClassifierNet(nn.Module):
    """A CharRNN's embedding and recurrent stack, pooling over time, dropout and a linear head.

    The ``embed`` and ``rnn`` submodules have a language model's parameter
    names and shapes, so :meth:`load_encoder` copies a trained LM's exactly.

    With ``pool_layers="all"`` the head reads the pooled outputs of every
    layer, not the top layer's only (as ELMo reads every layer of its language
    model); the stack then runs one layer at a time, padded.

    Padding never reaches the pooled features: batches hold texts of similar
    length, and ``packing`` picks how the recurrent stack skips the padding.
    ``"packed"``: packed sequences, no step is computed on padding. ``"padded"``
    (forward-only stacks): the right-padded batch runs through the fused
    kernel and pooling reads each text's valid steps only; a forward stack's
    outputs at valid steps do not depend on the padding after them, so the
    result is the same. ``"auto"`` (the default) packs on GPUs and for
    bidirectional stacks, and pads for forward stacks on the CPU, where
    PyTorch's packed LSTM bypasses oneDNN and runs several times slower than
    the fused kernel on bucketed batches (``benchmarks/bench_classify.py --packing``).
    """

    def __init__(self, encoder: ModelConfig, n_outputs: int, pooling: str = "concat", bidirectional: bool = False,
                 head_dropout: float = 0.0, pool_layers: str = "top"):
        super().__init__()
        check_pooling(pooling, pool_layers, bidirectional)
        self.encoder_config, self.pooling, self.bidirectional = encoder, pooling, bidirectional
        self.pool_layers = pool_layers
        base = CharRNN(replace(encoder, tie_weights=False))
        self.embed, self.embed_drop = base.embed, base.embed_drop
        self.rnn = _bidirectional_stack(encoder) if bidirectional else base.rnn
        if pool_layers == "all" and not isinstance(self.rnn, nn.RNNBase):
            every = setting("pool_layers", "all")
            raise CharnnError(f"{every} runs the library's LSTM/GRU/RNN kernels one layer at a time, and this encoder "
                              f"uses charnn's own cell ({setting('gate_slope')} or {setting('layer_norm')}); drop {every}")
        directions = 2 if bidirectional else 1
        read = encoder.layers if pool_layers == "all" else 1
        self.features = encoder.hidden * directions * (3 if pooling == "concat" else 1) * read
        self.head_drop = Dropout(head_dropout)
        self.head = nn.Linear(self.features, n_outputs)
        self.packing = "auto"

    def load_encoder(self, lm: CharRNN) -> None:
        """Copy a language model's embedding and recurrent weights (exactly)."""
        if self.bidirectional:
            raise CharnnError("a bidirectional classifier cannot start from a language model (it reads left to right); "
                              f"drop {setting('bidirectional')} or {setting('init_from')}")
        self.embed.load_state_dict(lm.embed.state_dict())
        self.rnn.load_state_dict(lm.rnn.state_dict())

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled features (batch, features) of right-padded ``ids`` with true ``lengths``."""
        x = self.embed_drop(self.embed(ids))
        if self.pool_layers == "all":  # forward only, padded: each layer's valid steps are pooled on their own
            _, _, outputs = run_layers(self.rnn, x)
            lengths = lengths.to(x.device)
            rows = torch.arange(ids.size(0), device=x.device)
            return torch.cat([pool(out, out[rows, lengths - 1], lengths, self.pooling) for out in outputs], 1)
        if self.packs(x.device):
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, h = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))
            h = h[0] if isinstance(h, tuple) else h
            last = torch.cat([h[-2], h[-1]], dim=1) if self.bidirectional else h[-1]
        else:  # forward only: right padding never reaches the valid steps, and the fused CPU kernel is faster
            out, _ = run_recurrent(self.rnn, x)
            last = out[torch.arange(ids.size(0), device=ids.device), lengths.to(ids.device) - 1]
        return pool(out, last, lengths.to(out.device), self.pooling)

    def packs(self, device: torch.device) -> bool:
        """Whether texts run as packed sequences (see ``packing``)."""
        if not isinstance(self.rnn, nn.RNNBase):
            return False  # charnn's own cell takes padded batches (forward only)
        if self.bidirectional or self.packing == "packed":
            return True  # the backward direction must start at each text's own end
        return self.packing == "auto" and device.type != "cpu"

    @property
    def n_outputs(self) -> int:
        return self.head.out_features

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.encode(ids, lengths)))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Trainable parameters from the top down: head, recurrent layers (top first), embedding."""
        layers: dict[int, list[nn.Parameter]] = {}
        for name, p in self.rnn.named_parameters():
            m = re.search(r"_l(\d+)", name)
            layers.setdefault(int(m.group(1)) if m else self.encoder_config.layers - 1, []).append(p)
        groups = [list(self.head.parameters())] + [layers[k] for k in sorted(layers, reverse=True)]
        if self.encoder_config.embed_dim:  # a one-hot table stays frozen
            groups.append([self.embed.weight])
        return groups


class ClassifierEnsemble(nn.Module):
    """Classifiers of one architecture whose predicted probabilities average.

    ``forward`` returns scores whose softmax (sigmoid when multi-label) is the
    members' mean probability: the log of the mean for one label per text, the
    logit of the mean for multi-label.
    """

    def __init__(self, members: Sequence[ClassifierNet], multi_label: bool):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.multi_label = multi_label

    @property
    def n_outputs(self) -> int:
        return self.members[0].n_outputs

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(ids, lengths).float() for m in self.members])
        if self.multi_label:
            return torch.logit(torch.sigmoid(logits).mean(0), eps=1e-7)
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(len(self.members))


def _bidirectional_stack(c: ModelConfig) -> nn.Module:
    if c.uses_custom_cell:
        raise CharnnError(f"{setting('bidirectional')} needs the library cell; drop "
                          f"{setting('gate_slope')}/{setting('layer_norm')}")
    kwargs = dict(num_layers=c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0, bidirectional=True)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[c.cell]
    if c.cell == "rnn":
        kwargs["nonlinearity"] = c.activation
    rnn = cls(c.input_dim, c.hidden, **kwargs)
    init_recurrent(rnn, c)
    return rnn


def check_pooling(pooling: str, pool_layers: str, bidirectional: bool) -> None:
    """Refuse an unknown ``pooling`` or ``pool_layers``, and every-layer pooling of a bidirectional stack."""
    if pooling not in POOLINGS:
        raise CharnnError(f"{setting('pooling')} must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pool_layers not in POOL_LAYERS:
        raise CharnnError(f"{setting('pool_layers')} must be one of {', '.join(POOL_LAYERS)}, got {pool_layers!r}")
    if pool_layers == "all" and bidirectional:
        every = setting("pool_layers", "all")
        raise CharnnError(f"{every} reads a forward stack; drop {setting('bidirectional')} or {every}")


def pool(out: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """Pool recurrent outputs (batch, time, hidden) over each text's valid steps."""
    if how == "last":
        return last
    mask = (torch.arange(out.size(1), device=out.device)[None, :] < lengths[:, None]).unsqueeze(-1)
    mean = (out * mask).sum(1) / lengths[:, None].to(out.dtype)
    if how == "mean":
        return mean
    peak = out.masked_fill(~mask, float("-inf")).amax(1)
    return peak if how == "max" else torch.cat([last.to(out.dtype), mean, peak], dim=1)


def predict_logits(net: ClassifierNet | ClassifierEnsemble, encoded: Sequence[np.ndarray], *, device: torch.device | str = "cpu",
                   precision: str = "fp32", batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Scores (n, outputs) of encoded texts, in their order; batches of similar length."""
    return _run_batches(net, net.forward, net.n_outputs, encoded, device, precision, batch_size)


def encoder_features(net: ClassifierNet, encoded: Sequence[np.ndarray], *, device: torch.device | str = "cpu",
                     precision: str = "fp32", batch_size: int = PREDICT_BATCH,
                     on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Pooled encoder features (n, features) of encoded texts, in their order (what the head reads)."""
    return _run_batches(net, net.encode, net.features, encoded, device, precision, batch_size, on_batch)


@torch.no_grad()
def _run_batches(net: nn.Module, fn, width: int, encoded: Sequence[np.ndarray], device, precision: str,
                 batch_size: int, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """``fn(ids, lengths)`` in eval mode over batches of similar length, rows in the texts' order."""
    device = torch.device(device)
    was_training = net.training
    net.eval()
    out = np.zeros((len(encoded), width), dtype=np.float32)
    try:
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        for idx in length_batches(lengths, batch_size):
            ids, lens = collate(encoded, idx)
            with autocast(device, precision):
                values = fn(ids.to(device), lens)
            out[idx] = values.float().cpu().numpy()
            if on_batch:
                on_batch(len(idx))
    finally:
        net.train(was_training)
    return out


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    t = torch.from_numpy(logits)
    return (torch.sigmoid(t) if multi_label else torch.softmax(t, dim=1)).numpy()


# -- metrics ------------------------------------------------------------------------------------------------
def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1 of index (or 0/1 matrix) labels.

    Macro averages run over the classes present in the truth or the
    predictions (scikit-learn's default). Single-label reports carry the
    confusion matrix (rows: true class, columns: predicted); multi-label
    reports give subset accuracy and per-class counts.
    """
    classes = [_py(c) for c in classes]
    k = len(classes)
    if y_true.ndim == 2:
        t, p = y_true > 0, y_pred > 0
        tp = (t & p).sum(0)
        support, predicted = t.sum(0), p.sum(0)
        accuracy = float((t == p).all(1).mean()) if len(t) else float("nan")
        cm = None
    else:
        cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
        tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
        accuracy = float(tp.sum() / max(len(y_true), 1)) if len(y_true) else float("nan")
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = (support > 0) | (predicted > 0)
    macro = lambda v: float(v[present].mean()) if present.any() else 0.0  # noqa: E731
    report = {
        "examples": int(len(y_true)), "accuracy": accuracy, "macro_f1": macro(f1),
        "macro_precision": macro(precision), "macro_recall": macro(recall), "multi_label": y_true.ndim == 2,
        "per_class": [{"label": c, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                       "support": int(support[i]), "predicted": int(predicted[i])} for i, c in enumerate(classes)],
        "labels": classes,
    }
    if cm is not None:
        report["confusion_matrix"] = cm.tolist()
    return report


def format_report(report: dict, max_matrix_classes: int = 30) -> str:
    """The report as text tables: summary, per-class scores and the confusion matrix."""
    lines = [f"examples {report['examples']:,}   accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   "
             f"macro precision {report['macro_precision']:.4f}   macro recall {report['macro_recall']:.4f}", ""]
    names = [str(c) for c in report["labels"]]
    width = max([len(n) for n in names] + [5])
    lines.append(f"{'class':<{width}}  precision  recall      f1  support  predicted")
    for row in report["per_class"]:
        lines.append(f"{str(row['label']):<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}"
                     f"  {row['support']:7d}  {row['predicted']:9d}")
    cm = report.get("confusion_matrix")
    if cm is not None and len(names) <= max_matrix_classes:
        cell = max(len(str(max(max(r) for r in cm))), len(str(len(names) - 1)), 3)
        lines += ["", "confusion matrix (rows: true class, columns: predicted, numbered as the rows)",
                  " " * (width + 5) + " ".join(f"{j:>{cell}}" for j in range(len(names)))]
        for i, (name, r) in enumerate(zip(names, cm)):
            lines.append(f"{i:>3} {name:<{width}} " + " ".join(f"{v:>{cell}}" for v in r))
    elif cm is not None:
        lines += ["", f"(confusion matrix of {len(names)} classes omitted from the text output; see --json)"]
    return "\n".join(lines)


def plot_confusion_matrix(report: dict, output: str | Path) -> Path:
    """Write the report's confusion matrix as a PNG (needs the 'plot' extra)."""
    from .plotting import require_matplotlib, save_figure

    cm = report.get("confusion_matrix")
    if cm is None:
        raise CharnnError("a multi-label report has no confusion matrix to plot; drop --plot")
    plt = require_matplotlib()
    cm = np.asarray(cm)
    names = [str(c) for c in report["labels"]]
    size = min(max(4.0, 0.45 * len(names) + 2), 16)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    if len(names) <= 25:
        for i in range(len(names)):
            for j in range(len(names)):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    return save_figure(plt, fig, output, "confusion.png")


# -- configuration ------------------------------------------------------------------------------------------
def _language_models(value) -> str | list[str] | None:
    """``init_from`` as stored: None, one absolute path (a string), or a list of two or more (one of one is the
    path)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return as_absolute_path(value)
    models = [as_absolute_path(m) for m in as_path_list(value, "init_from")]
    return (models or [None])[0] if len(models) < 2 else models


SCRATCH_ONLY = ("cell", "layers", "hidden", "embed_dim", "dropout", "embed_dropout", "min_char_count")  # not with init_from


@dataclass
class ClassifyConfig:
    """Options of a classifier (the parameters of :class:`TextClassifier`)."""

    # encoder (ignored with init_from: the language model's architecture is used)
    cell: str = "lstm"
    layers: int = 1
    hidden: int = 256
    embed_dim: int = 64
    dropout: float = 0.0
    embed_dropout: float = 0.0
    bidirectional: bool = False
    min_char_count: int = 1
    # pooling and head
    pooling: str = "concat"
    head_dropout: float = 0.2
    multi_label: bool = False
    balance: bool = False
    max_chars: int | None = 1000
    truncation: str = "head"
    random_crop: float = 0.0  # augmentation: the probability that a drawn training text is cut to a random window
    pool_layers: str = "top"  # "all": the head reads every recurrent layer's pooled outputs
    newline_frame: bool = False  # read "\n" + text + "\n", as a language model trained on one text per line saw it
    # transfer
    init_from: str | list[str] | None = None  # several: member i of an ensemble fine-tunes from the i-th (cycling)
    freeze_encoder: bool | None = None  # None: on when fine-tuning with < PROBE_BELOW_STEPS_PER_EPOCH steps per epoch
    gradual_unfreeze: bool | None = None  # None: on when fine-tuning
    layer_lr_decay: float | None = None  # None: 2.6 when fine-tuning, else 1
    # optimisation
    batch_size: int = 32
    lr: float = 3e-3
    optimizer: str = "adam"
    weight_decay: float | None = None  # None: the optimizer's default (0.01 for AdamW, else 0)
    momentum: float = 0.9
    nesterov: bool = False
    grad_clip: float = 5.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    # ensemble: members trained one after another, each with its own initialisation and batch order
    ensemble: int | None = None  # None: 1, or one member per language model in init_from
    member: int = 0  # which member this run trains (0: the run a single classifier is)
    # budget and validation
    max_epochs: float | None = 30
    max_steps: int | None = None
    time_budget: float | None = None
    patience: int | None = 5
    eval_every: int | None = None
    val_fraction: float = 0.1
    seed: int = 1234
    # run
    device: str = "auto"
    precision: str = "fp32"
    out: str | None = None
    log_every: int = 10
    quiet: bool = True

    def __post_init__(self):
        self.out, self.init_from = as_path(self.out), _language_models(self.init_from)  # the strings JSON stores
        if self.ensemble is None:
            self.ensemble = len(self.init_from) if isinstance(self.init_from, list) else 1  # one member per model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifyConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def fine_tuning(self) -> bool:
        return bool(self.init_from)

    @property
    def member_init_from(self) -> str | None:
        """The language model this member fine-tunes from: the only one, or member i's of several (cycling)."""
        models = self.init_from
        return models[self.member % len(models)] if isinstance(models, list) else models

    def unfreeze_gradually(self) -> bool:
        return self.fine_tuning if self.gradual_unfreeze is None else bool(self.gradual_unfreeze)

    def lr_decay(self) -> float:
        return (FINE_TUNE_LR_DECAY if self.fine_tuning else 1.0) if self.layer_lr_decay is None else self.layer_lr_decay

    def validate(self) -> None:
        check_types(self)
        checks = [
            (self.cell in CELLS, "cell", f"must be one of {', '.join(CELLS)}, got {self.cell!r}"),
            (self.truncation in TRUNCATIONS, "truncation",
             f"must be one of {', '.join(TRUNCATIONS)}, got {self.truncation!r}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.weight_decay is None or self.weight_decay >= 0, "weight_decay",
             f"must be 0 (off) or positive, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (0 <= self.head_dropout < 1, "head_dropout", f"must be in [0, 1), got {self.head_dropout}"),
            (0 <= self.random_crop <= 1, "random_crop", f"must be a probability in [0, 1], got {self.random_crop}"),
            (self.max_chars is None or self.max_chars >= 1, "max_chars", f"must be at least 1, got {self.max_chars}"),
            (self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}"),
            (self.lr > 0, "lr", f"must be positive, got {self.lr}"),
            (self.grad_clip >= 0, "grad_clip", f"must be 0 (off) or positive, got {self.grad_clip}"),
            (self.warmup_steps >= 0, "warmup_steps", f"must be 0 or more, got {self.warmup_steps}"),
            (self.min_char_count >= 1, "min_char_count", f"must be at least 1, got {self.min_char_count}"),
            (self.lr_decay() >= 1, "layer_lr_decay",
             f"must be at least 1 (1: one rate for all layers), got {self.layer_lr_decay}"),
            (self.max_epochs is None or 0 < self.max_epochs < math.inf, "max_epochs",
             f"must be a positive (finite) number, got {self.max_epochs}"),
            (0 <= self.seed < SEED_LIMIT, "seed", f"must be in [0, 2**63), got {self.seed}"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"),
            (self.log_every >= 1, "log_every", f"must be at least 1, got {self.log_every}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be at least 1, got {self.max_steps}"),
            (self.time_budget is None or self.time_budget > 0, "time_budget", "must be positive"),
            (self.max_epochs or self.max_steps or self.time_budget, None,
             f"give a budget: {setting('max_epochs')}, {setting('max_steps')} or {setting('time_budget')}"),
            (self.patience is None or self.patience >= 1, "patience",
             f"must be at least 1 ({off_value('0')} turns early stopping off), got {self.patience}"),
            (self.ensemble >= 1, "ensemble", f"must be at least 1 (1: a single classifier), got {self.ensemble}"),
            (not isinstance(self.init_from, list) or self.ensemble >= len(self.init_from), "ensemble",
             f"must be at least the number of language models ({len(self.init_from or ())}, one member from each), "
             f"got {self.ensemble}"),
            (self.eval_every is None or self.eval_every >= 1, "eval_every", f"must be at least 1, got {self.eval_every}"),
            (0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}"),
            (not (self.bidirectional and self.init_from), "bidirectional", "trains from scratch only (a language "
             f"model reads left to right); drop {setting('bidirectional')} or {setting('init_from')}"),
            (not (self.freeze_encoder and not self.init_from), "freeze_encoder", "keeps a language model's encoder "
             f"fixed; give it one with {setting('init_from')}"),
            (not (self.gradual_unfreeze and not self.init_from), "gradual_unfreeze", "unfreezes a language model's "
             f"layers one per epoch; give it one with {setting('init_from')}, or drop {setting('gradual_unfreeze')}"),
            (not (self.random_crop and self.freeze_encoder), "freeze_encoder", "fits the head once on whole texts' "
             f"features, so there is nothing to crop; drop {setting('random_crop')} or {setting('freeze_encoder')}"),
            (not (self.gradual_unfreeze and self.freeze_encoder), "freeze_encoder", "trains the head only, so there "
             f"is nothing to unfreeze; drop {setting('gradual_unfreeze')} or {setting('freeze_encoder')}"),
        ]
        check_settings(checks)
        check_pooling(self.pooling, self.pool_layers, self.bidirectional)

    @property
    def init_seed(self) -> int:
        """Seed of the weights, dropout and batch order: ``seed`` for the first member, then ``seed`` + 1...
        (the validation split always follows ``seed``, so every member validates on the same texts)."""
        return self.seed + self.member

    @property
    def frame(self) -> str:
        """What goes before and after every text."""
        return FRAME if self.newline_frame else ""

    def encoder_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, cell=self.cell, layers=self.layers, hidden=self.hidden,
                           embed_dim=self.embed_dim, dropout=self.dropout, embed_dropout=self.embed_dropout)


class ClassifierInterrupted(TrainingInterrupted):
    """Raised after Ctrl-C or SIGTERM once a resumable checkpoint is written."""

    def __init__(self, run_dir: Path, signum: int, checkpoint: Path | None = None, from_python: bool = False):
        super().__init__(run_dir, signum, checkpoint)
        how = (f"TextClassifier.resume({str(run_dir)!r}, texts, labels) with the same data" if from_python
               else f"charnn classify train --resume {run_dir}")
        self.args = (f"training interrupted; resume with: {how}",)


@dataclass
class ClassifyResult:
    run_dir: Path | None
    steps: int
    epochs: float
    best_val_f1: float | None
    best_val_accuracy: float | None
    last_val_f1: float | None
    train_texts: int
    val_texts: int
    train_chars_per_sec: float
    elapsed: float
    stop_reason: str
    probe: dict | None = None  # a linear probe's choice: {"c", "folds", "cv_loss"}
    members: list[dict] | None = None  # an ensemble's members: their seeds and results

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d


def _fingerprint(texts: Sequence[str], y: np.ndarray) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()[:16]


# -- the trainer ------------------------------------------------------------------------------------------
class ClassifierTrainer(BudgetClock):
    """One classifier training run; build it, or :meth:`resume` a run directory, then :meth:`fit`.

    Without ``run_dir`` (and without ``cfg.out``) nothing is written: the best
    weights are kept in memory. ``data_info`` (file paths and column names)
    is stored so ``--resume`` can read the same data again.
    """

    def __init__(self, cfg: ClassifyConfig, texts: Sequence[str], labels, val_texts: Sequence[str] | None = None,
                 val_labels=None, *, run_dir: str | Path | None = None, data_info: dict | None = None,
                 resume_from: ckpt.Checkpoint | None = None, on_log: Callable[[dict], None] | None = None):
        cfg.validate()
        self.cfg, self.on_log, self.data_info = cfg, on_log, data_info
        self.device = pick_device(cfg.device)
        self.precision = pick_precision(cfg.precision, self.device)
        texts = check_texts(texts)
        if labels is None:
            raise InvalidInput("this classifier requires y to be passed, but the target y is None; give one label per text")
        if not texts:
            raise InvalidInput("no training texts; pass at least one example of each of two classes")
        if len(texts) != len(labels):
            raise InvalidInput(f"{len(texts)} texts but {len(labels)} labels; give one label (set) per text")
        if (val_texts is None) != (val_labels is None):
            raise InvalidInput("give val_texts and val_labels together (one label per validation text), or neither "
                               "to validate on a stratified split of the training data")
        known = _class_array(resume_from.config["classifier"]["classes"]) if resume_from else None
        self.classes, y = encode_labels(labels, cfg.multi_label, known)
        if len(self.classes) < 2:
            raise InvalidInput(f"the training data has a single class ({_py(self.classes[0])!r}); "
                              "a classifier needs examples of at least two")
        if val_texts is None:
            tr, va = stratified_split(_split_keys(y), cfg.val_fraction, cfg.seed)
            val_texts, y_val = [texts[i] for i in va], y[va]
            texts, y = [texts[i] for i in tr], y[tr]
        else:
            val_texts = check_texts(val_texts)
            if len(val_texts) != len(val_labels):
                raise InvalidInput(f"{len(val_texts)} validation texts but {len(val_labels)} labels")
            _, y_val = encode_labels(val_labels, cfg.multi_label, self.classes, UNSEEN_IN_VAL)
        self.texts, self.y, self.val_texts, self.y_val = texts, y, val_texts, y_val
        self.fingerprint = _fingerprint(texts + list(val_texts), np.concatenate([y, y_val]))
        lm = None
        if resume_from:
            self.vocab = resume_from.vocab
            self.encoder_config = resume_from.model_config()
        elif cfg.init_from:
            from .lm import load_language_model

            lm, lm_ckpt = load_language_model(cfg.member_init_from, device="cpu")
            self.vocab, self.encoder_config = lm_ckpt.vocab, lm.config
            self.lm_path = str(lm_ckpt.path)
            for name in ("cell", "layers", "hidden", "embed_dim", "dropout", "embed_dropout"):
                setattr(cfg, name, getattr(lm.config, name))  # the run's settings say what it really used
        else:
            chars = training_vocabulary("".join(texts), cfg.min_char_count, "the training texts").chars
            self.vocab = Vocabulary(chars + list(cfg.frame))  # the frame is known however rare in the texts
            self.encoder_config = cfg.encoder_config(len(self.vocab))
        if cfg.frame and cfg.frame not in self.vocab:
            raise CharnnError(f"{setting('newline_frame')} needs a newline in the language model's vocabulary, and "
                              f"{cfg.member_init_from} has none (its corpus had no line breaks); drop "
                              f"{setting('newline_frame')}")
        self.train_ids = encode_texts(texts, self.vocab, cfg.max_chars, cfg.truncation, cfg.frame)
        self.val_ids = encode_texts(val_texts, self.vocab, cfg.max_chars, cfg.truncation, cfg.frame)
        self.lengths = np.array([len(e) for e in self.train_ids], dtype=np.int64)
        torch.manual_seed(cfg.init_seed)
        with fits_in_memory(self.encoder_config):
            self.net = self._new_net().to(self.device)
        if lm is not None:
            self.net.load_encoder(lm)
        self.groups = self.net.layer_groups()
        self.optimizer = self._make_optimizer()
        self.schedule = LRSchedule(cfg)
        self.loss_weights = self._loss_weights()
        self.steps_per_epoch = math.ceil(len(self.texts) / cfg.batch_size)
        self.auto_probe = cfg.freeze_encoder is None and cfg.gradual_unfreeze is not True and not cfg.random_crop and \
            cfg.fine_tuning and self.steps_per_epoch < PROBE_BELOW_STEPS_PER_EPOCH  # asking for either asks to fine-tune
        if cfg.freeze_encoder is None:  # the run's settings say what it really used
            cfg.freeze_encoder = self.auto_probe
        # progress
        self.step = self.epoch = self.batch_in_epoch = 0
        self.train_chars, self.train_seconds, self.elapsed_before = 0, 0.0, 0.0
        self.best: dict | None = None  # validation metrics of the best model
        self.last: dict | None = None
        self.bad_evals = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        if resume_from:
            self.run_dir = Path(resume_from.path.parent)
            with ckpt.restoring(resume_from):
                self._restore(resume_from)
        else:
            out = run_dir or cfg.out
            self.run_dir = ckpt.new_run_dir(out, "classify") if out else None

    # -- construction ---------------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        """One parameter group per layer, top first; each layer down learns ``lr_decay`` times slower."""
        decay = self.cfg.lr_decay()
        opt = make_optimizer(self.cfg, self.groups[0])
        opt.param_groups[0]["base_lr"] = self.cfg.lr
        for depth, params in enumerate(self.groups[1:], start=1):
            lr = self.cfg.lr / decay ** depth
            opt.add_param_group({"params": params, "lr": lr, "base_lr": lr})
        return opt

    def _loss_weights(self) -> torch.Tensor | None:
        """``balance``: class weights n / (k * count) (multi-label: positive weights negatives / positives)."""
        if not self.cfg.balance:
            return None
        if self.y.ndim == 2:
            pos = self.y.sum(0)
            w = (len(self.y) - pos) / np.maximum(pos, 1)
        else:
            counts = np.bincount(self.y, minlength=len(self.classes))
            w = len(self.y) / (len(self.classes) * np.maximum(counts, 1))
        return torch.tensor(w, dtype=torch.float32, device=self.device)

    @classmethod
    def from_files(cls, cfg: ClassifyConfig, data: str | Path, val: str | Path | None = None, *, text_col: str = "text",
                   label_col: str = "label", label_sep: str = "|", encoding: str = "utf-8", **kwargs) -> "ClassifierTrainer":
        """Read ``data`` (and ``val``) with :func:`read_labelled` and set up a run on them."""
        info = {"data": str(data), "val": str(val) if val else None, "text_col": text_col, "label_col": label_col,
                "label_sep": label_sep, "encoding": encoding}
        train, vdata = _read_info(info, cfg.multi_label)
        info.update(data=os.path.abspath(data), val=os.path.abspath(val) if val else None)  # --resume reads them anywhere
        if cfg.out is None and kwargs.get("run_dir") is None:
            kwargs["run_dir"] = ckpt.new_run_dir(None, f"{Path(data).stem}-classify")
        return cls(cfg, train.texts, train.labels, vdata.texts if vdata else None, vdata.labels if vdata else None,
                   data_info=info, **kwargs)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict | None = None, data: tuple | None = None,
               **kwargs) -> "ClassifierTrainer":
        """Continue a run where its last checkpoint stopped; ``overrides`` may extend the budget.

        The data is read again from the files the run was started on, unless
        ``data`` = (texts, labels, val_texts, val_labels) is given; it must be
        the same data.
        """
        source = ckpt.load_checkpoint(run_dir, which="last", with_train_state=True)
        if source.kind != KIND:
            raise CharnnError(f"{source.path} is a {source.kind} checkpoint; resume it with charnn train --resume")
        cfg, data = _resumed_settings(run_dir, source, overrides, data)
        trainer = cls(cfg, *data, data_info=source.config.get("data"), resume_from=source, **kwargs)
        if trainer.fingerprint != source.train_state.get("fingerprint"):
            raise CharnnError(f"the data changed since {run_dir} started (or is split differently); "
                              "start a new run on the new data")
        return trainer

    def _new_net(self) -> ClassifierNet:
        """A freshly initialised network of this run's architecture (on the CPU)."""
        c = self.cfg
        return ClassifierNet(self.encoder_config, len(self.classes), c.pooling, c.bidirectional, c.head_dropout,
                             c.pool_layers)

    def _restore(self, source: ckpt.Checkpoint) -> None:
        source.load_weights(self.net, self.device)
        st, tensors = source.train_state, source.train_tensors
        ckpt.restore_optimizer(self.optimizer, st["optimizer"], {k: v.to(self.device) for k, v in tensors.items()})
        self.schedule.load(st["schedule"])
        for name, value in ckpt.counters(st, ("step", "epoch", "batch_in_epoch", "train_chars", "bad_evals")).items():
            setattr(self, name, value)
        for name in ("train_seconds", "best", "last"):
            setattr(self, name, st[name])
        self.elapsed_before = st["elapsed"]
        self.lm_path = source.config["classifier"].get("init_from")
        best_dir = self.run_dir / "best"
        if ckpt.is_checkpoint_dir(best_dir):
            best_net = self._new_net()
            ckpt.load_checkpoint(best_dir).load_weights(best_net)
            self.best_state = {k: v.detach().clone() for k, v in best_net.state_dict().items()}
        torch.set_rng_state(tensors["rng.torch"])  # last: building a network above draws random numbers
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        ckpt.truncate_metrics(self.run_dir, self.step)

    # -- training -----------------------------------------------------------------------------------------------
    def trainable_groups(self) -> int:
        """How many layer groups (from the top) train in the current epoch."""
        if self.cfg.freeze_encoder:
            return 1
        if self.cfg.unfreeze_gradually():
            return min(self.epoch + 1, len(self.groups))
        return len(self.groups)

    def _apply_freezing(self) -> None:
        n = self.trainable_groups()
        for i, params in enumerate(self.groups):
            for p in params:
                p.requires_grad_(i < n)

    def _set_lr(self) -> float:
        factor = self.schedule.factor(self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.cfg.lr * factor

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.cfg.multi_label:
            return F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.loss_weights)
        return F.cross_entropy(logits, y, weight=self.loss_weights)

    def _targets(self, y: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y[idx]).to(self.device)

    def train_step(self, idx: np.ndarray) -> float:
        batch = [self.train_ids[i] for i in idx]
        if self.cfg.random_crop:  # drawn from the seed and the step, so a resumed run crops as an unbroken one
            batch = random_crops(batch, self.cfg.random_crop, np.random.default_rng([self.cfg.init_seed, self.step, CROP_STREAM]))
        ids, lengths = collate(batch, np.arange(len(batch)))
        self.train_chars += int(lengths.sum())
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            logits = self.net(ids.to(self.device), lengths)
        loss = self._loss(logits, self._targets(self.y, idx))
        loss.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.grad is not None], self.cfg.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def _epoch_batches(self) -> list[np.ndarray]:
        """This epoch's batches; the order depends on the seed and the epoch only (so resume repeats it)."""
        return length_batches(self.lengths, self.cfg.batch_size, np.random.default_rng([self.cfg.init_seed, self.epoch]))

    def validate(self) -> dict | None:
        """Validation loss, accuracy and macro-F1 (None without validation texts)."""
        return validation_metrics(self.net, self.val_ids, self.y_val, self.classes, self.cfg.multi_label, self.device,
                                  self.precision)

    def fit(self) -> ClassifyResult:
        cfg = self.cfg
        if self.run_dir:
            make_dirs(self.run_dir, f"the run directory ({setting('out')})")
        self.start_clock()
        if cfg.freeze_encoder:
            return self._fit_probe()
        bar = BudgetBar(self, disable=cfg.quiet)
        stop_reason = self.why_finished()  # a resumed run may have nothing left to train: no step past its end
        self.net.train()
        with StopSignals() as stop, bar:
            while stop_reason is None:
                batches = self._epoch_batches()
                self._apply_freezing()
                for idx in batches[self.batch_in_epoch:]:
                    lr = self._set_lr()
                    t0 = time.perf_counter()
                    loss = self.train_step(idx)
                    self.train_seconds += time.perf_counter() - t0
                    self.step += 1
                    self.batch_in_epoch += 1
                    if self.batch_in_epoch == len(batches):
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if not math.isfinite(loss):  # keep the checkpoints saved before, write none
                        self._log({"train_loss": None, "diverged": True})
                        stop_reason = "diverged"
                        break
                    if self.step % cfg.log_every == 0 or self.batch_in_epoch == 0:
                        self._log({"train_loss": round(loss, 5), "lr": lr, "trainable_groups": self.trainable_groups()})
                    stop_reason = stop_reason or self._budget_spent()
                    if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.batch_in_epoch == 0 or stop_reason:
                        stop_reason = self._evaluate_and_save(stop_reason)
                    bar.update(self._bar_text(loss))
                    if stop.signum is not None:
                        self._log({"interrupted": signal.Signals(stop.signum).name})
                        if self.run_dir:
                            self.save("last")
                            raise ClassifierInterrupted(self.run_dir, stop.signum, from_python=not self.data_info)
                        raise KeyboardInterrupt
                    if stop_reason or self.batch_in_epoch == 0:
                        break
        if stop_reason == "diverged" and self.run_dir:
            ckpt.discard_run_without_checkpoint(self.run_dir)
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)
        return self._result(stop_reason)

    def _result(self, stop_reason: str, probe: dict | None = None) -> ClassifyResult:
        self.net.eval()
        best = self.best or {}
        return ClassifyResult(self.run_dir, self.step, self._epoch_progress(), best.get("val_macro_f1"),
                              best.get("val_accuracy"), (self.last or {}).get("val_macro_f1"), len(self.texts),
                              len(self.val_texts), self.train_chars / max(self.train_seconds, 1e-9), self._elapsed(),
                              stop_reason, probe)

    def why_finished(self) -> str | None:
        """Also ``"linear-probe"`` once a probe run has fitted its head (a probe trains in one pass)."""
        if self.cfg.freeze_encoder and self.epoch >= 1:
            return "linear-probe"
        return super().why_finished()

    def _fit_probe(self) -> ClassifyResult:
        """The linear probe: one pass of the frozen encoder over the training texts, then logistic regression on
        its pooled features with the L2 strength chosen by cross-validation (:func:`charnn.probe.fit_probe`)."""
        from tqdm.auto import tqdm

        fits = probe_fit_count(self.y, self.cfg.multi_label)
        with tqdm(total=len(self.texts) + fits, desc="probe", unit="item", disable=self.cfg.quiet, leave=False) as bar:
            t0 = time.perf_counter()
            features = encoder_features(self.net, self.train_ids, device=self.device, precision=self.precision,
                                        on_batch=bar.update)
            weights = None if self.loss_weights is None else self.loss_weights.cpu()
            fit = fit_probe(torch.from_numpy(features), self.y, multi_label=self.cfg.multi_label, class_weights=weights,
                            outputs=len(self.classes), seed=self.cfg.init_seed, on_fit=lambda: bar.update(1))
            self.train_seconds += time.perf_counter() - t0
        with torch.no_grad():
            self.net.head.weight.copy_(fit.weight)
            self.net.head.bias.copy_(fit.bias)
        self.train_chars += int(self.lengths.sum())
        self.epoch, self.batch_in_epoch = 1, 0
        for c, loss in fit.cv_loss.items():
            self._log({"probe_c": c, "cv_log_loss": round(loss, 5), "folds": fit.folds})
        probe = {"c": fit.c, "folds": fit.folds, "cv_loss": {f"{c:g}": round(v, 5) for c, v in fit.cv_loss.items()}}
        self._log({"probe_chosen_c": fit.c})
        self._evaluate_and_save("linear-probe")
        return self._result("linear-probe", probe)

    def _bar_text(self, loss: float) -> str:
        f1 = f"{self.last['val_macro_f1']:.3f}" if self.last else "-"
        return f"loss {loss:.3f}, val macro-F1 {f1}"

    def _improved(self, val: dict) -> bool:
        if self.best is None:
            return True
        return (val["val_macro_f1"], -val["val_loss"]) > (self.best["val_macro_f1"], -self.best["val_loss"])

    def _evaluate_and_save(self, stop_reason: str | None) -> str | None:
        val = self.validate()
        if val is not None and not math.isfinite(val["val_loss"]):  # the weights blew up: save nothing from them
            self._log({"val_loss": None, "diverged": True})
            return "diverged"
        self.last = val
        improved = val is None or self._improved(val)
        if val is not None:
            self.schedule.observe(val["val_loss"])
            self.bad_evals = 0 if improved else self.bad_evals + 1
            self.best = val if improved else self.best
            self._log({**val, "best_val_macro_f1": self.best["val_macro_f1"]})
            if self.patience_spent() and not stop_reason:
                stop_reason = "early-stopping"
        if improved:
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            if self.run_dir:
                self.save("best")
        if self.run_dir:
            self.save("last")
        return stop_reason

    # -- checkpoints and logging ------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        cfg = self.cfg
        return {
            "kind": KIND,
            "charnn_version": _version(),
            "model": self.encoder_config.to_dict(),
            "classifier": {
                "classes": [_py(c) for c in self.classes.tolist()], "multi_label": cfg.multi_label,
                "pooling": cfg.pooling, "bidirectional": cfg.bidirectional, "head_dropout": cfg.head_dropout,
                "max_chars": cfg.max_chars, "truncation": cfg.truncation, "threshold": THRESHOLD,
                "pool_layers": cfg.pool_layers, "frame": cfg.frame,
                "init_from": getattr(self, "lm_path", None),
            },
            "training": cfg.to_dict(),
            "data": self.data_info,
            "summary": {
                "step": self.step, "epoch": round(self._epoch_progress(), 4), "best": self.best, "last": self.last,
                "train_texts": len(self.texts), "val_texts": len(self.val_texts), "device": str(self.device),
                "precision": self.precision, "parameters": sum(p.numel() for p in self.net.parameters()),
                "elapsed": round(self._elapsed(), 2),
            },
        }

    def save(self, which: str) -> Path:
        """Write ``best`` (weights only) or ``last`` (with the full training state) under the run directory."""
        train_state = tensors = None
        if which == "last":
            opt_json, tensors = ckpt.optimizer_state(self.optimizer)
            train_state = {
                "optimizer": opt_json, "schedule": self.schedule.state(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "train_chars": self.train_chars,
                "train_seconds": self.train_seconds, "best": self.best, "last": self.last, "bad_evals": self.bad_evals,
                "elapsed": self._elapsed(), "fingerprint": self.fingerprint,
            }
            tensors["rng.torch"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state()
        return ckpt.save_checkpoint(self.run_dir / which, model=self.net, vocab=self.vocab, config=self.config_dict(),
                                    train_state=train_state, train_tensors=tensors)

    def _log(self, record: dict) -> None:
        record = {"step": self.step, "epoch": round(self._epoch_progress(), 4), **record,
                  "elapsed": round(self._elapsed(), 3)}
        if self.run_dir:
            ckpt.append_metrics(self.run_dir, record)
        if self.on_log:
            self.on_log(record)

    def describe(self) -> str:
        c, m = self.cfg, self.encoder_config
        source = f"fine-tuned from {self.lm_path}" if getattr(self, "lm_path", None) else "from scratch"
        unfreeze = (f"encoder frozen (linear probe: {self.steps_per_epoch} steps per epoch are too few for gradual "
                    "unfreezing; --no-freeze-encoder fine-tunes anyway)" if self.auto_probe else
                    "encoder frozen (linear probe)" if c.freeze_encoder else
                    "gradual unfreezing" if c.unfreeze_gradually() else "all layers train")
        return (
            f"model: {m.layers}x{m.hidden} {m.cell.upper()}{' bidirectional' if c.bidirectional else ''}, "
            f"embed {m.embed_dim or 'one-hot'}, {c.pooling} pooling, {len(self.classes)} classes"
            f"{' (multi-label)' if c.multi_label else ''}, {sum(p.numel() for p in self.net.parameters()):,} parameters; "
            f"{source}\n"
            f"data: {len(self.texts):,} training / {len(self.val_texts):,} validation texts, vocabulary {len(self.vocab)}; "
            f"batch {c.batch_size}, {self.steps_per_epoch} steps per epoch\n"
            f"device: {self.device} ({self.precision}); lr {c.lr:g} ({c.schedule}, layer decay {c.lr_decay():g}), "
            f"{unfreeze}{', balanced class weights' if c.balance else ''}"
            f"{f', random crops (p {c.random_crop:g})' if c.random_crop else ''}"
            f"{', every layer pooled' if c.pool_layers == 'all' else ''}{', texts framed by newlines' if c.frame else ''}\n"
            f"run directory: {self.run_dir}"
        )


def validation_metrics(net: nn.Module, val_ids: Sequence[np.ndarray], y_val: np.ndarray, classes: np.ndarray,
                       multi_label: bool, device, precision: str) -> dict | None:
    """Loss, accuracy and macro-F1 of ``net`` on encoded validation texts (None without any)."""
    if not val_ids:
        return None
    logits = predict_logits(net, val_ids, device=device, precision=precision)
    t = torch.from_numpy(logits)
    y = torch.from_numpy(y_val)
    if multi_label:
        loss = float(F.binary_cross_entropy_with_logits(t, y))
        pred = (torch.sigmoid(t) >= THRESHOLD).numpy().astype(np.float32)
    else:
        loss = float(F.cross_entropy(t, y))
        pred = logits.argmax(1)
    rep = classification_report(y_val, pred, classes)
    return {"val_loss": round(loss, 5), "val_accuracy": round(rep["accuracy"], 5), "val_macro_f1": round(rep["macro_f1"], 5)}


class EnsembleTrainer:
    """``cfg.ensemble`` classifiers trained one after another, whose predictions average.

    Member *i* is an ordinary classifier run (in ``RUN/member-i`` when there is
    a run directory) on the same data and validation split, initialised and
    batched with seed ``seed + i - 1``; budgets and early stopping apply to each.
    When all have finished, ``RUN/best`` holds them together as one
    :class:`ClassifierEnsemble` checkpoint, which ``predict``/``eval`` load like
    any other. ``RUN/ensemble.json`` lists the finished members, so Ctrl-C and
    ``--resume`` continue the member that was training.
    """

    PROGRESS = "ensemble.json"

    def __init__(self, cfg: ClassifyConfig, texts: Sequence[str], labels, val_texts: Sequence[str] | None = None,
                 val_labels=None, *, run_dir: str | Path | None = None, data_info: dict | None = None,
                 on_log: Callable[[dict], None] | None = None, resuming: bool = False):
        cfg.validate()
        self.cfg, self.on_log, self.data_info = cfg, on_log, data_info
        self.data = (texts, labels, val_texts, val_labels)
        out = run_dir or cfg.out
        self.run_dir = Path(out) if resuming else ckpt.new_run_dir(out, "classify") if out else None
        self.finished: list[dict] = []  # the finished members' results
        self.nets: list[ClassifierNet] = []
        if resuming:
            self._load_finished()
        else:
            _check_compatible_language_models(cfg.init_from)
        self.current = self._member(min(len(self.nets), cfg.ensemble - 1))  # all finished: the last, for its settings
        self.vocab, self.classes = self.current.vocab, self.current.classes
        self.device, self.precision = self.current.device, self.current.precision
        self.net: ClassifierEnsemble | None = None
        self.best: dict | None = None

    from_files = classmethod(ClassifierTrainer.from_files.__func__)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict | None = None, data: tuple | None = None,
               **kwargs) -> "EnsembleTrainer":
        """Continue an ensemble run: the finished members are loaded, the interrupted one resumes."""
        source = ckpt.load_checkpoint(Path(run_dir) / "member-1", which="last")
        cfg, data = _resumed_settings(run_dir, source, overrides, data)
        cfg.member = 0
        return cls(cfg, *data, run_dir=run_dir, data_info=source.config.get("data"), resuming=True, **kwargs)

    @classmethod
    def is_ensemble_run(cls, run_dir: str | Path) -> bool:
        return (Path(run_dir) / "member-1").is_dir()

    @property
    def step(self) -> int:
        return self.current.step

    def why_finished(self) -> str | None:
        """``"ensemble"`` once every member has finished and the ensemble is saved (nothing is left to do), else None."""
        saved = self.run_dir is None or ckpt.is_checkpoint_dir(self.run_dir / "best")
        return "ensemble" if len(self.nets) == self.cfg.ensemble and saved else None

    def _member_dir(self, i: int) -> Path | None:
        return self.run_dir / f"member-{i + 1}" if self.run_dir else None

    def _member(self, i: int) -> ClassifierTrainer:
        """The trainer of member ``i``: resumed where its run directory has a resumable checkpoint, else new."""
        cfg = replace(self.cfg, member=i)
        member_dir = self._member_dir(i)
        if member_dir and ckpt.is_checkpoint_dir(member_dir / "last"):
            return ClassifierTrainer.resume(member_dir, {k: getattr(cfg, k) for k in RESUME_OVERRIDES}, self.data,
                                            on_log=self.on_log)
        if member_dir and member_dir.exists():
            shutil.rmtree(member_dir)  # interrupted before its first checkpoint: nothing to keep
        return ClassifierTrainer(cfg, *self.data, run_dir=member_dir, data_info=self.data_info, on_log=self.on_log)

    def _load_finished(self) -> None:
        progress = self.run_dir / self.PROGRESS
        self.finished = json.loads(progress.read_text())["members"] if progress.is_file() else []
        for i in range(len(self.finished)):
            self.nets.append(load_classifier(self._member_dir(i))[0])

    def describe(self) -> str:
        seeds = ", ".join(str(replace(self.cfg, member=i).init_seed) for i in range(self.cfg.ensemble))
        done = f"; {len(self.finished)} finished" if self.finished else ""
        models = (f", fine-tuned from {len(self.cfg.init_from)} language models in turn"
                  if isinstance(self.cfg.init_from, list) else "")
        return (f"{self.current.describe()}\nensemble: {self.cfg.ensemble} members (seeds {seeds}){models} in "
                f"{self.run_dir}/member-N{done}; their mean probability predicts")

    def fit(self) -> ClassifyResult:
        """Train the members still to train, then write and return the ensemble."""
        for i in range(len(self.nets), self.cfg.ensemble):
            if self.current.cfg.member != i:
                self.current = self._member(i)
            try:
                result = self.current.fit()
            except ClassifierInterrupted as e:
                raise ClassifierInterrupted(self.run_dir, e.signum, e.checkpoint, from_python=not self.data_info) from None
            if result.stop_reason == "diverged":  # no ensemble from a member that blew up
                if self.run_dir and not self.finished:
                    ckpt.discard_run_without_checkpoint(self.run_dir)
                return replace(result, run_dir=self.run_dir, members=self.finished)
            self.nets.append(self.current.net)
            self.finished.append({"member": i + 1, "seed": self.current.cfg.init_seed, **result.to_dict()})
            if self.run_dir:
                ckpt.write_json_atomic(self.run_dir / self.PROGRESS, {"members": self.finished})
        self.net = ClassifierEnsemble(self.nets, self.cfg.multi_label).eval()
        self.best = validation_metrics(self.net, self.current.val_ids, self.current.y_val, self.classes,
                                       self.cfg.multi_label, self.device, self.precision)
        if self.run_dir:
            ckpt.save_checkpoint(self.run_dir / "best", model=self.net, vocab=self.vocab, config=self.config_dict())
        best = self.best or {}
        return ClassifyResult(self.run_dir, self._total("steps"), self._total("epochs"), best.get("val_macro_f1"),
                              best.get("val_accuracy"), best.get("val_macro_f1"), self.finished[0]["train_texts"],
                              self.finished[0]["val_texts"], float(np.mean([m["train_chars_per_sec"] for m in self.finished])),
                              self._total("elapsed"), "ensemble", members=self.finished)

    def _total(self, key: str):
        """The finished members' steps, epochs or seconds added up."""
        return sum(m[key] for m in self.finished)

    def config_dict(self) -> dict:
        """The members' shared settings (member 0's seed) with ``classifier.members`` and the ensemble's
        validation scores."""
        config = self.current.config_dict()
        config["classifier"]["members"] = self.cfg.ensemble
        if isinstance(self.cfg.init_from, list):
            config["classifier"]["init_from"] = [str(ckpt.resolve_checkpoint(m)) for m in self.cfg.init_from]
        config["training"] = {**config["training"], "member": 0}
        config["summary"] = {**config["summary"], "best": self.best, "last": self.best,
                             "step": self._total("steps"), "epoch": round(self._total("epochs"), 4),
                             "elapsed": round(self._total("elapsed"), 2),
                             "parameters": sum(p.numel() for p in self.net.parameters()),
                             "members": [{k: m[k] for k in ("member", "seed", "steps", "epochs", "best_val_f1",
                                                            "stop_reason")} for m in self.finished]}
        return config


def _check_compatible_language_models(init_from) -> None:
    """Several language models (one per ensemble member) must share one vocabulary and one architecture: the
    ensemble reads each text once, with one vocabulary, and its checkpoint describes every member with one
    encoder configuration (dropout may differ: it is off when predicting)."""
    if not isinstance(init_from, list):
        return
    from .lm import read_language_model

    def shape(config: ModelConfig) -> dict:
        return {k: v for k, v in config.to_dict().items() if k not in ("dropout", "embed_dropout", "weight_drop")}

    first_config, first = read_language_model(init_from[0])
    first_shape = shape(first_config)
    for path in init_from[1:]:
        config, other = read_language_model(path)
        if other.vocab.chars != first.vocab.chars:
            raise CharnnError(f"the language models {first.path} and {other.path} have different vocabularies, and an "
                              f"ensemble reads its texts with one; give {setting('init_from')} models trained on the "
                              "same corpus")
        differ = [f"{k} {first_shape[k]} vs {v}" for k, v in shape(config).items() if first_shape[k] != v]
        if differ:
            raise CharnnError(f"the language models {first.path} and {other.path} differ in architecture "
                              f"({', '.join(differ)}); give {setting('init_from')} models of one architecture")


def _resumed_settings(run_dir, source: ckpt.Checkpoint, overrides: dict | None, data: tuple | None):
    """A run's settings with ``overrides`` (None values ignored), and its data: ``data`` as given, or read again
    from the files the run was started on."""
    cfg = source.settings("training", _saved_config)
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, key, value)
    info = source.config.get("data")
    if data is None:
        if not info:
            raise CharnnError(f"{run_dir} was trained on data passed from Python; resume it from Python with the same "
                              f"data: TextClassifier.resume({str(run_dir)!r}, texts, labels)")
        train, vdata = _read_info(info, cfg.multi_label)
        data = (train.texts, train.labels, vdata.texts if vdata else None, vdata.labels if vdata else None)
    return cfg, data


def _saved_config(data: dict) -> ClassifyConfig:
    """A run's settings as its config.json holds them, checked as a new run's are."""
    cfg = ClassifyConfig.from_dict(data)
    cfg.validate()
    return cfg


def _read_info(info: dict, multi_label: bool) -> tuple[LabelledData, LabelledData | None]:
    kw = dict(text_col=info["text_col"], label_col=info["label_col"], multi_label=multi_label,
              label_sep=info.get("label_sep", "|"), encoding=info.get("encoding", "utf-8"))
    return read_labelled(info["data"], **kw), (read_labelled(info["val"], **kw) if info.get("val") else None)


def _version() -> str:
    from . import __version__

    return __version__


# -- loading ------------------------------------------------------------------------------------------------
def load_classifier(path: str | Path | None = None, *, which: str = "best", device: str | torch.device = "cpu"):
    """``(net, checkpoint)`` of a trained classifier (a run or checkpoint directory), the net in eval mode
    (a :class:`ClassifierEnsemble` when the run trained several members)."""
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    ck = ckpt.load_checkpoint(path, which=which)
    if ck.kind != KIND:
        raise CharnnError(f"{ck.path} is a {ck.kind} checkpoint, not a classifier; pass a run made by charnn classify train")
    try:
        encoder = ck.model_config()
        meta = ck.config["classifier"]
        members = [ClassifierNet(encoder, len(meta["classes"]), meta["pooling"], meta["bidirectional"],
                                 meta["head_dropout"], meta.get("pool_layers", "top"))
                   for _ in range(meta.get("members", 1))]
        net = members[0] if len(members) == 1 else ClassifierEnsemble(members, meta["multi_label"])
    except (KeyError, TypeError) as e:
        raise CharnnError(f"{ck.path / ckpt.CONFIG} is damaged (classifier settings: {e}); use another checkpoint") from e
    ck.load_weights(net)
    return net.to(device).eval(), ck


# -- the scikit-learn style estimator -------------------------------------------------------------------------
class NotFittedError(CharnnError, ValueError, AttributeError):
    """The classifier was used before ``fit`` (or ``load``).

    Where scikit-learn is installed the error raised is also an instance of
    ``sklearn.exceptions.NotFittedError``.
    """


@functools.lru_cache(maxsize=None)
def _not_fitted_class() -> type:
    try:
        from sklearn.exceptions import NotFittedError as SklearnNotFitted  # noqa: PLC0415 (optional)
    except ImportError:
        return NotFittedError
    return type("NotFittedError", (NotFittedError, SklearnNotFitted), {"__module__": __name__})


class _Params:
    """get_params/set_params/repr/tags as scikit-learn defines them, without importing scikit-learn."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        valid = self._get_param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"Invalid parameter {key!r} for estimator {type(self).__name__}; valid: {valid}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if defaults.get(k, inspect.Parameter.empty) != v]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags  # noqa: PLC0415 (only for scikit-learn)

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True), transformer_tags=None,
                    regressor_tags=None, classifier_tags=ClassifierTags(multi_label=bool(getattr(self, "multi_label", False))),
                    input_tags=InputTags(one_d_array=True, two_d_array=False, string=True), requires_fit=True)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "net_")


class TextClassifier(_Params):
    """A character-RNN text classifier with scikit-learn's conventions.

    ``fit(texts, labels)`` trains (from scratch, or from a language model with
    ``init_from``), keeping the model with the best validation macro-F1 on a
    stratified ``val_fraction`` of the data; ``predict``/``predict_proba``
    read lists of strings. The parameters are those of :class:`ClassifyConfig`.
    With ``multi_label=True`` labels are collections of labels per text (or a
    0/1 matrix), and ``predict`` returns a 0/1 matrix over ``classes_``.

    Fitted attributes: ``classes_``, ``vocab_``, ``net_``, ``run_dir_`` (the run directory: ``out``, or the
    run a loaded checkpoint belongs to; None otherwise) and, after ``fit`` or ``resume`` (not ``load``),
    ``result_`` (a :class:`ClassifyResult`). ``TextClassifier.resume(run, texts, labels)`` continues a fit
    that Ctrl-C or SIGTERM interrupted.
    """

    def __init__(self, *, cell="lstm", layers=1, hidden=256, embed_dim=64, dropout=0.0, embed_dropout=0.0,
                 bidirectional=False, min_char_count=1, pooling="concat", head_dropout=0.2, multi_label=False,
                 balance=False, max_chars=1000, truncation="head", random_crop=0.0, pool_layers="top",
                 newline_frame=False, init_from=None, freeze_encoder=None,
                 gradual_unfreeze=None, layer_lr_decay=None, batch_size=32, lr=3e-3, optimizer="adam",
                 weight_decay=None, momentum=0.9, nesterov=False, grad_clip=5.0, warmup_steps=0, schedule="cosine",
                 min_lr_ratio=0.05, ensemble=None, max_epochs=30, max_steps=None, time_budget=None, patience=5,
                 eval_every=None, val_fraction=0.1, seed=1234, device="auto", precision="fp32", out=None, log_every=10,
                 quiet=True):
        self.cell, self.layers, self.hidden, self.embed_dim = cell, layers, hidden, embed_dim
        self.dropout, self.embed_dropout, self.bidirectional = dropout, embed_dropout, bidirectional
        self.min_char_count, self.pooling, self.head_dropout = min_char_count, pooling, head_dropout
        self.multi_label, self.balance, self.max_chars, self.truncation = multi_label, balance, max_chars, truncation
        self.random_crop, self.pool_layers, self.newline_frame = random_crop, pool_layers, newline_frame
        self.init_from, self.freeze_encoder, self.gradual_unfreeze = init_from, freeze_encoder, gradual_unfreeze
        self.layer_lr_decay, self.batch_size, self.lr, self.optimizer = layer_lr_decay, batch_size, lr, optimizer
        self.weight_decay, self.momentum, self.nesterov, self.grad_clip = weight_decay, momentum, nesterov, grad_clip
        self.warmup_steps, self.schedule, self.min_lr_ratio = warmup_steps, schedule, min_lr_ratio
        self.ensemble = ensemble
        self.max_epochs, self.max_steps, self.time_budget, self.patience = max_epochs, max_steps, time_budget, patience
        self.eval_every, self.val_fraction, self.seed, self.device = eval_every, val_fraction, seed, device
        self.precision, self.out, self.log_every, self.quiet = precision, out, log_every, quiet

    def config(self) -> ClassifyConfig:
        return ClassifyConfig(**self.get_params())

    def _warn_about_ignored_settings(self, cfg: ClassifyConfig) -> None:
        """Encoder settings changed from their defaults do nothing with ``init_from``: say so (the CLI refuses them)."""
        defaults = ClassifyConfig()
        ignored = [f"{name}={getattr(cfg, name)!r}" for name in SCRATCH_ONLY
                   if cfg.init_from and getattr(cfg, name) != getattr(defaults, name)]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} ignored: with init_from the encoder is the language model's (its "
                          "cell, size, dropout and vocabulary); drop these settings or init_from", UserWarning,
                          stacklevel=3)

    # -- training ----------------------------------------------------------------------------------------------
    def fit(self, X, y, *, val_texts=None, val_labels=None, on_log: Callable[[dict], None] | None = None):
        """Train on texts ``X`` with labels ``y``; validate on ``val_texts`` or a stratified split. Returns self."""
        cfg = self.config()
        self._warn_about_ignored_settings(cfg)
        with caller_rng_kept():  # training seeds PyTorch from cfg.seed; the caller's own draws are left alone
            trainer = (EnsembleTrainer if cfg.ensemble > 1 else ClassifierTrainer)(
                cfg, X, _as_labels(y), val_texts, None if val_labels is None else _as_labels(val_labels), on_log=on_log)
            self.result_ = trainer.fit()
        self._adopt_trained(trainer)
        return self

    @classmethod
    def resume(cls, run_dir: str | Path, X=None, y=None, *, val_texts=None, val_labels=None,
               on_log: Callable[[dict], None] | None = None) -> "TextClassifier":
        """Continue an interrupted run (Ctrl-C or SIGTERM during ``fit`` with ``out``) and return the fitted
        classifier. Runs fitted on texts passed from Python need the same ``X``, ``y`` (and validation texts)
        again; runs of ``charnn classify train`` read their files again."""
        data = None if X is None else (X, _as_labels(y), val_texts, None if val_labels is None else _as_labels(val_labels))
        trainer_class = EnsembleTrainer if EnsembleTrainer.is_ensemble_run(run_dir) else ClassifierTrainer
        trainer = trainer_class.resume(run_dir, data=data, on_log=on_log)
        clf = cls(**{k: v for k, v in trainer.cfg.to_dict().items() if k in cls._get_param_names()})
        with caller_rng_kept():
            clf.result_ = trainer.fit()
        clf._adopt_trained(trainer)
        return clf

    def _adopt_trained(self, trainer) -> None:
        """Take the network, vocabulary and run of a trainer that has fitted (``fit`` or ``resume``)."""
        self._adopt(trainer.net, trainer.vocab, trainer.classes, trainer.config_dict(), trainer.device, trainer.precision)
        self.run_dir_ = trainer.run_dir

    def _adopt(self, net, vocab, classes, config: dict, device, precision) -> None:
        self.net_, self.vocab_ = net.eval(), vocab
        self.classes_ = classes if isinstance(classes, np.ndarray) else _class_array(list(classes))
        self.checkpoint_config_ = config
        self.device_, self.precision_ = device, precision
        self.n_classes_ = len(self.classes_)

    # -- inference -----------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise _not_fitted_class()(f"this {type(self).__name__} is not fitted yet; call fit(texts, labels) or "
                                 "TextClassifier.load(path) first")

    def decision_function(self, X) -> np.ndarray:
        """Raw class scores (logits), shape (n_texts, n_classes)."""
        self._check_fitted()
        meta = self.checkpoint_config_["classifier"]
        encoded = encode_texts(check_texts(X), self.vocab_, meta["max_chars"], meta["truncation"], meta.get("frame", ""))
        return predict_logits(self.net_, encoded, device=self.device_, precision=self.precision_)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n_texts, n_classes): softmax, or independent sigmoids when multi-label."""
        return probabilities(self.decision_function(X), self._multi_label())

    def predict(self, X) -> np.ndarray:
        """One label per text (from ``classes_``); a 0/1 matrix over ``classes_`` when multi-label."""
        proba = self.predict_proba(X)
        if self._multi_label():
            return (proba >= THRESHOLD).astype(np.int64)
        return self.classes_[proba.argmax(1)]

    def score(self, X, y) -> float:
        """Accuracy (exact-match accuracy when multi-label), as scikit-learn's classifiers score."""
        return self.evaluate(X, y)["accuracy"]

    def evaluate(self, X, y) -> dict:
        """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (see :func:`classification_report`)."""
        self._check_fitted()
        texts = check_texts(X)
        y = _as_labels(y)
        if len(texts) != len(y):
            raise InvalidInput(f"{len(texts)} texts but {len(y)} labels; give one label (set) per text")
        _, y_idx = encode_labels(y, self._multi_label(), self.classes_)
        proba = self.predict_proba(texts)
        pred = (proba >= THRESHOLD).astype(np.float32) if self._multi_label() else proba.argmax(1)
        return classification_report(y_idx, pred, self.classes_)

    def labels_of(self, indicator: np.ndarray) -> list[tuple]:
        """Multi-label predictions (0/1 rows) as tuples of class labels."""
        self._check_fitted()
        return [tuple(_py(c) for c in self.classes_[np.nonzero(row)[0]]) for row in np.asarray(indicator)]

    def _multi_label(self) -> bool:
        return bool(self.checkpoint_config_["classifier"]["multi_label"])

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fitted model as a checkpoint directory (safetensors + JSON) at ``path``: a new or empty folder,
        or, with ``overwrite=True``, an earlier classifier checkpoint (never another kind of model, nor a run's own
        ``best``/``last``, whose run would no longer match it)."""
        self._check_fitted()
        target = Path(path)
        if ckpt.is_checkpoint_dir(target):
            kind = ckpt.load_checkpoint(target).kind
            if kind != "classifier":
                raise CharnnError(f"{target} holds a {kind} checkpoint; save the classifier to another folder")
            if (target.parent / ckpt.METRICS).is_file():  # a run directory's best/ or last/
                raise CharnnError(f"{target} is a checkpoint of the run {target.parent}; save to another folder")
            if not overwrite:
                raise CharnnError(f"{target} already holds a classifier checkpoint; pass overwrite=True to replace it, "
                                  "or save to another folder")
        return ckpt.save_checkpoint(target, model=self.net_, vocab=self.vocab_, config=self.checkpoint_config_)

    @classmethod
    def load(cls, path: str | Path, *, which: str = "best", device: str = "cpu") -> "TextClassifier":
        """A fitted classifier from a checkpoint or run directory (``which``: best or last)."""
        net, ck = load_classifier(path, which=which, device=device)
        params = (ck.settings("training", ClassifyConfig.from_dict) if "training" in ck.config else ClassifyConfig()).to_dict()
        clf = cls(**{k: v for k, v in params.items() if k in cls._get_param_names()})
        clf.set_params(device=device)
        config = {k: v for k, v in ck.config.items() if k not in ("format", "format_version", "saved_at")}
        clf._adopt(net, ck.vocab, ck.config["classifier"]["classes"], config, next(net.parameters()).device, "fp32")
        clf.run_dir_ = ck.path.parent if ck.path.name in ckpt.RUN_CHECKPOINTS else None  # else a save()d checkpoint
        return clf


def _as_labels(y):
    """Labels as given, but pandas objects and other iterables become lists or arrays."""
    if y is None or isinstance(y, np.ndarray):
        return y
    if hasattr(y, "to_numpy"):
        return y.to_numpy()
    return list(y)
