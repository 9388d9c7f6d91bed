"""``charnn classify train|predict|eval``: text classification with the character encoder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import CharnnError
from . import CharnnGroup, main, refuse_to_replace
from .train import fit_or_exit, given_on_command_line, parse_duration, refuse_on_resume, resume_options


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@main.group("classify", cls=CharnnGroup)
def classify():
    """Classify whole texts with a character RNN (from scratch or fine-tuned from a language model).

    \b
    Examples:
      charnn classify train reviews.csv --text-col review --label-col stars
      charnn classify train names.tsv --init-from checkpoints/names-lm --max-epochs 10
      charnn classify predict checkpoints/reviews-classify-... "great value" "broke in a week"
      charnn classify eval checkpoints/reviews-classify-... test.csv --plot confusion.png
    """


_DATA_OPTIONS = [
    click.option("--text-col", default="text", show_default=True, help="Column (CSV/TSV header, JSONL key) holding the text."),
    click.option("--label-col", default="label", show_default=True, help="Column holding the label."),
    click.option("--label-sep", default="|", show_default=True, help="With --multi-label: separator of several labels in one CSV/TSV field."),
    click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of the data files."),
]


def _data_options(f):
    for option in reversed(_DATA_OPTIONS):
        f = option(f)
    return f


@classify.command("train")
@click.argument("data", required=False, type=click.Path())
@_data_options
@click.option("--val", "val_data", type=click.Path(), help="Validation data (same format); default: a stratified split of DATA.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Stratified fraction of DATA that validates (without --val).")
@click.option("--multi-label", is_flag=True, help="Texts may have several labels (sigmoid outputs, threshold 0.5).")
@click.option("--init-from", type=click.Path(), multiple=True,
              help="Start the encoder from this language model (charnn train run); its vocabulary too. Repeat it to "
                   "fine-tune an ensemble's members from several models trained on the same corpus (one member from "
                   "each, in turn; --ensemble defaults to their number).")
@click.option("--freeze-encoder/--no-freeze-encoder", default=None,
              help="Train the head only: a linear probe of the language model's features, fitted as logistic regression "
                   "with its L2 strength chosen by 5-fold cross-validation.  "
                   "[default: on with --init-from when an epoch is under 32 steps, i.e. fewer than 32 x batch texts, "
                   "unless --gradual-unfreeze or --random-crop is given]")
@click.option("--gradual-unfreeze/--no-gradual-unfreeze", default=None, help="Unfreeze one layer per epoch from the top.  [default: on with --init-from]")
@click.option("--layer-lr-decay", type=float, help="Each layer down learns this many times slower.  [default: 2.6 with --init-from, else 1]")
@click.option("--cell", type=click.Choice(["lstm", "gru", "rnn"]), default="lstm", show_default=True, help="Recurrent cell (from scratch).")
@click.option("--layers", type=int, default=1, show_default=True, help="Stacked recurrent layers (from scratch).")
@click.option("--hidden", type=int, default=256, show_default=True, help="Hidden units per layer (from scratch).")
@click.option("--embed-dim", type=int, default=64, show_default=True, help="Character embedding size, 0: one-hot (from scratch).")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout between recurrent layers (from scratch).")
@click.option("--embed-dropout", type=float, default=0.0, show_default=True, help="Dropout on the embeddings (from scratch).")
@click.option("--bidirectional", is_flag=True, help="Read texts in both directions (from scratch only).")
@click.option("--min-char-count", type=int, default=1, show_default=True, help="Rarer characters map to the unknown symbol (from scratch).")
@click.option("--pooling", type=click.Choice(["last", "mean", "max", "concat"]), default="concat", show_default=True,
              help="Pool the recurrent outputs over time; concat = last + mean + max.")
@click.option("--pool-layers", type=click.Choice(["top", "all"]), default="top", show_default=True,
              help="Pool the top recurrent layer, or every layer, each pooled alike (ELMo-style: the head also sees "
                   "a language model's lower layers). Forward stacks only.")
@click.option("--newline-frame", is_flag=True,
              help="Read each text as a line, between newlines: how a language model trained on one text per line "
                   "saw each one (--init-from).")
@click.option("--head-dropout", type=float, default=0.2, show_default=True, help="Dropout before the linear head.")
@click.option("--balance", is_flag=True, help="Weight classes by inverse frequency (helps macro-F1 on imbalanced data).")
@click.option("--max-chars", type=int, default=1000, show_default=True, help="Truncate longer texts to this many characters; 0: never.")
@click.option("--truncation", type=click.Choice(["head", "tail", "both"]), default="head", show_default=True,
              help="Which part of a text longer than --max-chars is kept: its head, its tail, or half of each.")
@click.option("--random-crop", type=float, default=0.0, show_default=True,
              help="Augmentation: each time a training text is drawn, with this probability it is cut to a random "
                   "window of 50-100% of its characters (at least 10), so the classifier learns to use every cue in "
                   "a text; 0.5 helped SMS spam (benchmarks/RESULTS.md). Not with a linear probe.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Texts per step.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Learning rate of the head; each layer below learns --layer-lr-decay times slower (2.6 with --init-from).")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "rmsprop", "sgd"]), default="adam", show_default=True)
@click.option("--weight-decay", type=float, help="L2 penalty; decoupled for adamw.  [default: 0.01 with adamw, else 0]")
@click.option("--grad-clip", type=float, default=5.0, show_default=True, help="Global gradient-norm clip; 0 disables.")
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear learning-rate warmup.")
@click.option("--schedule", type=click.Choice(["cosine", "plateau", "constant"]), default="cosine", show_default=True)
@click.option("--ensemble", type=int,
              help="Train this many classifiers (seeds SEED, SEED+1, ...; same data and validation split) and predict "
                   "with their mean probability: steadier and usually more accurate, N times the training time.  "
                   "[default: 1, or one per --init-from]")
@click.option("--max-epochs", type=float, help="Stop after this many passes over the training texts (each member of an ensemble).  [default: 30]")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--time", "time_text", help="Wall-clock budget, e.g. 90s, 10m, 2h.")
@click.option("--eval-every", type=int, help="Validate every N steps (and at each epoch end).")
@click.option("--patience", type=int, default=5, show_default=True, help="Early stopping: evaluations without a better macro-F1 (at an equal one, a lower validation loss counts as better); 0 disables.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Random seed (split, initialisation, batch order).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--out", type=click.Path(), help="Run directory.  [default: checkpoints/DATA-classify-TIME]")
@click.option("--resume", type=click.Path(), help="Continue the run in this directory exactly where it stopped.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Write metrics every N steps.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (implies --quiet).")
def train_cmd(data, text_col, label_col, label_sep, encoding, val_data, time_text, max_chars, patience, resume, quiet,
              as_json, **opts):
    """Train a classifier on DATA: CSV, TSV or JSONL (columns by name), or a folder of per-label subfolders.

    Keeps the model with the best validation macro-F1 in RUN/best and a
    resumable RUN/last; Ctrl-C saves and tells how to resume. With --ensemble N
    the members train in RUN/member-1..N and RUN/best holds them all.
    """
    from ..budget import check_resumable
    from ..classify import RESUME_OVERRIDES, SCRATCH_ONLY, ClassifierTrainer, ClassifyConfig, EnsembleTrainer

    quiet = quiet or as_json  # as charnn train: a script reading the JSON wants no progress on the terminal either
    opts.update(time_budget=parse_duration(time_text), max_chars=max_chars or None, patience=patience or None,
                quiet=quiet)
    log = (lambda m: None) if quiet else _echo
    if resume:
        if data:
            raise CharnnError("--resume continues a run on its own data; drop the DATA argument")
        refuse_on_resume(resume_options(RESUME_OVERRIDES))
        overrides = {k: opts[k] for k in RESUME_OVERRIDES}
        trainer = (EnsembleTrainer if EnsembleTrainer.is_ensemble_run(resume) else ClassifierTrainer).resume(resume, overrides)
        check_resumable(trainer, resume)
        log(f"resuming {trainer.run_dir} at step {trainer.step}")
    else:
        if opts["max_epochs"] is None:
            del opts["max_epochs"]  # the default; on --resume, None keeps the run's own
        if not data:
            raise CharnnError("no data given; pass a CSV/TSV/JSONL file or a folder, e.g. charnn classify train data.csv")
        ignored = given_on_command_line(SCRATCH_ONLY) if opts["init_from"] else []
        if ignored:
            raise CharnnError(f"{', '.join(ignored)}: with --init-from the encoder is the language model's (its cell, "
                              "size, dropout and vocabulary); drop these options or --init-from")
        cfg = ClassifyConfig(**opts)
        trainer = (EnsembleTrainer if cfg.ensemble > 1 else ClassifierTrainer).from_files(
            cfg, data, val_data, text_col=text_col, label_col=label_col, label_sep=label_sep, encoding=encoding)
    log(trainer.describe())
    result = fit_or_exit(trainer, "charnn classify train", as_json)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    best = f"{result.best_val_f1:.4f} (accuracy {result.best_val_accuracy:.4f})" if result.best_val_f1 is not None else "n/a"
    if result.probe:
        how = (f"C {result.probe['c']:g} chosen by {result.probe['folds']}-fold cross-validation" if result.probe["folds"]
               else f"C {result.probe['c']:g}: too few texts per class to cross-validate")
        log(f"done (linear probe, {how}): {result.elapsed:.1f} s, validation macro-F1 {best}")
    elif result.members:
        log(f"done: {len(result.members)} members, {result.steps} steps in all, {result.elapsed:.1f} s; the "
            f"ensemble's validation macro-F1 {best} (members: "
            f"{', '.join(format(m['best_val_f1'] or 0, '.4f') for m in result.members)})")
    else:
        log(f"done ({result.stop_reason}): {result.steps} steps, {result.epochs:.2f} epochs, {result.elapsed:.1f} s, "
            f"best validation macro-F1 {best}")
    log(f"model saved in {result.run_dir}; evaluate with: charnn classify eval {result.run_dir} TEST_DATA")


def _read_inputs(texts: tuple[str, ...], file: str | None, encoding: str) -> list[str]:
    """Texts from the arguments, then the lines of --file; stdin lines when neither is given.

    Lines end at newlines only: str.splitlines would also cut a text at a form feed, \\x1c-\\x1e, \\x85 or U+2028."""
    from ..data import read_stdin, read_text, unix_newlines

    items = list(texts)
    if file:
        lines = (read_text(Path(file), encoding) if file != "-" else unix_newlines(read_stdin(encoding))).split("\n")
        items += [line for line in lines if line.strip()]
    elif not items:
        if sys.stdin.isatty():
            _echo("reading texts from standard input, one per line (Ctrl-D to end)")
        items = [line for line in unix_newlines(read_stdin(encoding)).split("\n") if line.strip()]
    if not items:
        raise CharnnError("no texts to classify; pass them as arguments, with --file, or one per line on standard input")
    return items


@classify.command("predict")
@click.argument("checkpoint", type=click.Path())
@click.argument("texts", nargs=-1)
@click.option("--file", "-f", "file", type=click.Path(), help="Classify each non-blank line of this file ('-': stdin).")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--top", type=int, default=1, show_default=True, help="Show the K most probable labels.")
@click.option("--last", is_flag=True, help="Use the run's last model rather than its best.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every prediction and all probabilities.")
def predict_cmd(checkpoint, texts, file, encoding, top, last, device, as_json):
    """Label TEXTS (or --file lines, or stdin lines) with a trained classifier.

    Text output: one line per text, LABEL<TAB>PROBABILITY[<TAB>...]<TAB>TEXT
    (multi-label: the predicted labels joined by | (- for none), then LABEL:PROBABILITY for each of them, or for
    the --top K most probable labels where those are more).
    """
    from ..classify import TextClassifier

    if top < 1:
        raise CharnnError(f"--top must be at least 1, got {top}")
    clf = TextClassifier.load(checkpoint, which="last" if last else "best", device=device)
    items = _read_inputs(texts, file, encoding)
    proba = clf.predict_proba(items)
    classes = [c.item() if hasattr(c, "item") else c for c in clf.classes_]
    multi = clf._multi_label()
    rows = []
    for text, p in zip(items, proba):
        if multi:
            chosen = [i for i in range(len(classes)) if p[i] >= 0.5]
            label = [classes[i] for i in chosen]
        else:
            chosen = [int(p.argmax())]
            label = classes[chosen[0]]
        rows.append({"text": text, "label": label, "probability": [float(p[i]) for i in chosen] if multi else float(p[chosen[0]]),
                     "probabilities": {str(c): float(v) for c, v in zip(classes, p)}})
    if as_json:
        click.echo(json.dumps({"checkpoint": str(clf.run_dir_ or checkpoint), "multi_label": multi, "predictions": rows}, ensure_ascii=False))
        return
    for row, p in zip(rows, proba):
        head = ("|".join(map(str, row["label"])) or "-") if multi else str(row["label"])
        shown = max(top, len(row["label"])) if multi else top  # the predicted labels (p >= 0.5) come first
        order = p.argsort()[::-1][:shown]
        scores = "\t".join(f"{classes[i]}:{p[i]:.3f}" if (top > 1 or multi) else f"{p[i]:.3f}" for i in order)
        click.echo(f"{head}\t{scores}\t{row['text']}")


@classify.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--text-col", help="Column holding the text.  [default: the one the model was trained with, else text]")
@click.option("--label-col", help="Column holding the label.  [default: the one the model was trained with, else label]")
@click.option("--label-sep", help="Multi-label separator.  [default: the training one, else |]")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--last", is_flag=True, help="Use the run's last model rather than its best.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(), help="Also write the confusion matrix as a PNG (needs the 'plot' extra).")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(checkpoint, data, text_col, label_col, label_sep, encoding, last, device, plot_path, force, as_json):
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix on labelled DATA."""
    from ..classify import TextClassifier, format_report, plot_confusion_matrix, read_labelled

    refuse_to_replace(plot_path, force, "--plot")
    clf = TextClassifier.load(checkpoint, which="last" if last else "best", device=device)
    trained = clf.checkpoint_config_.get("data") or {}
    labelled = read_labelled(data, text_col=text_col or trained.get("text_col", "text"),
                             label_col=label_col or trained.get("label_col", "label"),
                             label_sep=label_sep or trained.get("label_sep", "|"),
                             multi_label=clf._multi_label(), encoding=encoding)
    report = clf.evaluate(labelled.texts, labelled.labels)
    report = {"checkpoint": str(clf.run_dir_ or checkpoint), "data": str(data), **report}
    if plot_path:
        report["plot"] = str(plot_confusion_matrix(report, plot_path))
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    click.echo(f"{clf.run_dir_ or checkpoint} on {data}")
    click.echo(format_report(report))
    if plot_path:
        _echo(f"wrote {report['plot']}")
