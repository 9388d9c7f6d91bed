"""``charnn train``, ``charnn eval``, ``charnn info`` and ``charnn plot``."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict

import click

from ..errors import CharnnError
from . import WRITE_ERRORS, main, refuse_to_replace, reports_interruption

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$", re.IGNORECASE)


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '10m', '1.5h' -> seconds."""
    if text is None:
        return None
    m = _DURATION.match(text)
    if not m:
        raise CharnnError(f"--time must look like 90s, 10m or 2h, got {text!r}")
    unit = (m.group(2) or "s").lower()[0]
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


GLOB_HELP = ("Files to read inside directories, a pathlib pattern: '*.md' reads the top folder only, '**/*.md' "
             "every subfolder too.")


def _flag(ctx: click.Context, name: str) -> str:
    """The option ``name`` as typed: ``--no-x`` for a boolean flag switched off."""
    param = next(p for p in ctx.command.params if p.name == name)
    off = getattr(param, "secondary_opts", None) and ctx.params.get(name) is False
    return param.secondary_opts[0] if off else param.opts[0]


def given_on_command_line(names) -> list[str]:
    """Which of the options ``names`` the user typed (rather than left at their defaults), as --flags."""
    ctx = click.get_current_context()
    return [_flag(ctx, n) for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]


def resume_options(overrides) -> tuple[str, ...]:
    """The command's parameters a ``--resume`` accepts: the run's ``overrides`` (config names), --resume, --json."""
    return ("resume", "as_json", *("time_text" if k == "time_budget" else k for k in overrides))


def refuse_on_resume(allowed) -> None:
    """``--resume`` keeps a run's settings: options other than ``allowed`` (the budget, the device...) are an error."""
    ctx = click.get_current_context()
    fixed = given_on_command_line([n for n in ctx.params if n not in allowed])
    if fixed:
        takes = ", ".join(next(p.opts[0] for p in ctx.command.params if p.name == n) for n in allowed if n != "resume")
        raise CharnnError(f"{', '.join(fixed)}: a resumed run keeps its own settings (it takes only {takes}); "
                          "drop them, or start a new run")


def is_main_process(trainer) -> bool:
    """False on torchrun's other ranks: only rank 0 talks, as only it writes (the CLI's lines would repeat)."""
    dist = getattr(trainer, "dist", None)
    return dist is None or dist.is_main


def fit_or_exit(trainer, command: str, as_json: bool = False):
    """``trainer.fit()``; after Ctrl-C/SIGTERM print the checkpoint and the resume command (with ``as_json``
    also one JSON object on stdout, so a script reading it learns the same), then exit."""
    from .. import checkpoint as ckpt
    from ..training import TrainingInterrupted

    try:
        result = trainer.fit()
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir:
            ckpt.discard_run_without_checkpoint(run_dir)  # a retry with the same --out is not refused
        raise CharnnError(f"cannot write the run in {run_dir} ({e.strerror or e}); free some space or choose "
                          "another --out (checkpoints written before are kept)") from None
    except TrainingInterrupted as e:
        if not is_main_process(trainer):
            sys.exit(e.exit_code)
        resume = f"{command} --resume {e.run_dir}"
        _echo(f"\ninterrupted at step {trainer.step}; checkpoint saved in {e.checkpoint}")
        _echo(f"resume with: {resume}")
        if as_json:
            click.echo(json.dumps({"interrupted": True, "step": trainer.step, "run_dir": str(e.run_dir),
                                   "checkpoint": str(e.checkpoint), "resume": resume}))
        sys.exit(e.exit_code)
    if result.stop_reason == "diverged":
        kept = (f"the checkpoints saved before it are kept in {result.run_dir}" if result.run_dir and result.run_dir.is_dir()
                else "nothing was saved")
        raise CharnnError(f"training diverged (loss is not finite) at step {result.steps}; lower --lr or keep "
                          f"--grad-clip on ({kept})")
    return result


@main.command("train")
@click.argument("corpus", nargs=-1, type=click.Path())
@click.option("--glob", default="**/*", show_default=True, help=GLOB_HELP)
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of the corpus files.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Last fraction of the text that validates.")
@click.option("--min-char-count", type=int, default=1, show_default=True, help="Rarer characters map to the unknown symbol.")
@click.option("--preset", type=click.Choice(["tiny", "small", "medium", "large"]), help="Named size; default: the best for this device and budget.")
@click.option("--cell", type=click.Choice(["lstm", "gru", "rnn"]), help="Recurrent cell.  [default: lstm]")
@click.option("--layers", type=int, help="Stacked recurrent layers.")
@click.option("--hidden", type=int, help="Hidden units per layer.")
@click.option("--embed-dim", type=int, help="Character embedding size (0: one-hot).")
@click.option("--dropout", type=float, help="Dropout between layers and before the output layer.")
@click.option("--embed-dropout", type=float, help="Dropout on the embeddings.")
@click.option("--weight-drop", type=float, help="DropConnect on the recurrent weights (AWD-LSTM), a new mask per step.")
@click.option("--tie-weights/--no-tie-weights", default=None, help="Share the input embedding with the output layer.")
@click.option("--init", "init_scheme", type=click.Choice(["orthogonal", "identity", "xavier", "gaussian", "default"]), help="Recurrent weight initialisation (gaussian: N(0, 0.05^2), the naive baseline).  [default: orthogonal]")
@click.option("--forget-bias", type=float, help="LSTM forget-gate bias.  [default: 1]")
@click.option("--activation", type=click.Choice(["tanh", "relu"]), help="Plain RNN nonlinearity (relu + --init identity = IRNN).")
@click.option("--gate-slope", type=float, help="Steeper gates: sigmoid(S*x) (uses charnn's own cell when not 1).")
@click.option("--layer-norm/--no-layer-norm", default=None, help="Layer normalisation inside the recurrent cell.")
@click.option("--batch-size", type=int, help="Parallel text streams per step.")
@click.option("--seq-len", type=int, help="Characters per truncated-BPTT chunk.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "rmsprop", "sgd"]),
              help="Optimizer; adamw decays the weights apart from the gradient.  [default: the preset's: adamw for "
                   "medium, else adam]")
@click.option("--weight-decay", type=float, help="L2 penalty; decoupled for adamw; a value given here is used as it "
              "is.  [default: the preset's (medium: 0.2 when the budget allows 10 epochs, none up to 6, linear "
              "between); with another optimizer, 0.01 for adamw, else 0]")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--nesterov", is_flag=True, help="Nesterov momentum for SGD.")
@click.option("--grad-clip", type=float, default=5.0, show_default=True, help="Global gradient-norm clip; 0 disables.")
@click.option("--warmup-steps", type=int, help="Linear learning-rate warmup.")
@click.option("--schedule", type=click.Choice(["cosine", "plateau", "constant"]), default="cosine", show_default=True,
              help="cosine: decay to the end of the budget; plateau: halve when validation stalls.")
@click.option("--average-last", type=float, default=0.2, show_default=True,
              help="Average the weights over this last fraction of the budget (the saved best model); 0 disables.")
@click.option("--grad-accum", type=int, help="Micro-batches per step: global batch = processes x batch x K.  [default: 1]")
@click.option("--max-epochs", type=float, help="Stop after this many passes over the training text.  [default: 30 without --time, else none]")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--time", "time_text", help="Wall-clock budget, e.g. 90s, 10m, 2h.")
@click.option("--eval-every", type=int, help="Validate every N steps (and at each epoch end).")
@click.option("--patience", type=int, default=5, show_default=True, help="Early stopping: evaluations without improvement; 0 disables.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Random seed; the same seed gives the same run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
@click.option("--out", type=click.Path(), help="Run directory.  [default: checkpoints/NAME-TIME]")
@click.option("--resume", type=click.Path(), help="Continue the run in this directory exactly where it stopped.")
@click.option("--init-from", type=click.Path(), help="Fine-tune from this trained model.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Write metrics every N steps.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="At the end, print the result as one JSON object (implies --quiet).")
def train_cmd(corpus, time_text, init_scheme, use_compile, resume, quiet, as_json, **opts):
    """Train a character language model on CORPUS (files or directories).

    \b
    Examples:
      charnn train input.txt --time 10m
      charnn train notes/ --glob '**/*.md' --preset medium
      charnn train --resume checkpoints/input-20260101-120000
    """
    from ..budget import check_resumable
    from ..training import RESUME_OVERRIDES, Trainer, TrainConfig

    quiet = quiet or as_json
    opts.update(init=init_scheme, compile=use_compile, time_budget=parse_duration(time_text), quiet=quiet)
    if opts["patience"] == 0:
        opts["patience"] = None
    log = (lambda m: None) if quiet else _echo
    if resume:
        if corpus:
            raise CharnnError("--resume continues a run on its own corpus; drop the corpus arguments")
        refuse_on_resume(resume_options(RESUME_OVERRIDES))
        overrides = {k: opts[k] for k in RESUME_OVERRIDES}
        trainer = Trainer.resume(resume, overrides)
        check_resumable(trainer, resume)
    else:
        if not corpus:
            raise CharnnError("no corpus given; pass text files or directories, e.g. charnn train input.txt")
        trainer = Trainer(TrainConfig(corpus=list(corpus), **opts))
    if not is_main_process(trainer):
        log, as_json = (lambda m: None), False  # rank 0 alone reports, and prints the --json object
    if resume:
        log(f"resuming {trainer.run_dir} at step {trainer.step}")
    log(trainer.describe())
    result = fit_or_exit(trainer, "charnn train", as_json)
    if as_json:
        click.echo(json.dumps({**asdict(result), "run_dir": str(result.run_dir)}))
        return
    best = f"{result.best_val_bpc:.4f}" if result.best_val_bpc is not None else "n/a"
    decay = (f", weight decay {result.weight_decay:g} for {trainer.planned_epochs:.1f} planned epochs"
             if trainer.cfg.weight_decay_ramp and trainer.planned_epochs is not None else "")
    log(f"done ({result.stop_reason}): {result.steps} steps, {result.epochs:.2f} epochs, "
        f"{result.train_chars_per_sec:,.0f} chars/s, best val bpc {best}{decay}")
    log(f"model saved in {result.run_dir}; sample with: charnn sample {result.run_dir}")


@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--glob", default="**/*", show_default=True, help=GLOB_HELP)
@click.option("--last", is_flag=True, help="Use the run's last model rather than its best.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(checkpoint, files, encoding, glob, last, device, as_json):
    """Bits per character of FILES under a trained model."""
    from ..data import read_corpus_text
    from ..devices import pick_device
    from ..model import bits_per_char
    from ..training import evaluate
    from ..lm import load_language_model

    with reports_interruption(as_json, checkpoint=str(checkpoint), files=list(files)):
        dev = pick_device(device)
        model, ck = load_language_model(checkpoint, which="last" if last else "best", device=dev)
        text = read_corpus_text(files, glob, encoding)
        ids = ck.vocab.encode(text)
        if len(ids) < 2:
            raise CharnnError(f"{', '.join(files)} hold{'s' if len(files) == 1 else ''} {len(ids)} character(s); "
                              "scoring needs at least 2 (each character after the first is predicted)")
        nats, count = evaluate(model, ids, device=dev)
    unknown = int((ids == 0).sum())
    report = {"checkpoint": str(ck.path), "files": list(files), "chars": len(text), "scored_chars": count,
              "unknown_chars": unknown, "bpc": bits_per_char(nats), "nats_per_char": nats,
              "perplexity": float(__import__("math").exp(nats))}
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"{ck.path}: {report['bpc']:.4f} bits/char ({nats:.4f} nats, perplexity {report['perplexity']:.2f}) "
                   f"over {count:,} characters; {unknown:,} unknown")


@main.command("info")
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--last", is_flag=True, help="Describe the run's last model rather than its best.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_cmd(checkpoint, last, as_json):
    """Configuration, size, vocabulary and training history of a checkpoint."""
    from .. import checkpoint as ckpt
    from ..training import default_weight_decay

    ck = ckpt.load_checkpoint(checkpoint, which="last" if last else "best")
    ck.check_weights()  # the header only: a truncated or overwritten weights file is an error, not a success
    classifier = ck.config.get("classifier") if ck.kind == "classifier" else None
    run_dir = ckpt.run_of(ck.path)
    history = ckpt.read_metrics(run_dir) if run_dir else []  # a checkpoint saved on its own has none
    score, keys = ("val_macro_f1", ("step", "epoch", "val_loss", "val_accuracy", "val_macro_f1", "elapsed")) \
        if classifier is not None else ("val_bpc", ("step", "epoch", "val_bpc", "elapsed"))
    vals = [r for r in history if score in r]
    report = {
        "path": str(ck.path), "kind": ck.kind, "charnn_version": ck.config.get("charnn_version"),
        "model": ck.config.get("model"), "training": ck.config.get("training"), "summary": ck.config.get("summary"),
        "vocabulary": {"size": len(ck.vocab), "chars": "".join(ck.vocab.chars[1:])},
        "history": {"records": len(history), "evaluations": [{k: r[k] for k in keys if k in r} for r in vals]},
    }
    if classifier is not None:
        report["classifier"] = classifier
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    m, s = report["model"] or {}, report["summary"] or {}
    click.echo(f"checkpoint: {ck.path} ({ck.kind}, charnn {report['charnn_version']})")
    if m:
        click.echo(f"model: {m.get('layers')}x{m.get('hidden')} {str(m.get('cell')).upper()}, embed {m.get('embed_dim') or 'one-hot'}, "
                   f"dropout {m.get('dropout')}, {_count(s.get('parameters'))} parameters")
    if classifier is not None:
        for line in _classifier_lines(classifier):
            click.echo(line)
    click.echo(f"vocabulary: {len(ck.vocab)} symbols: {''.join(ck.vocab.chars[1:])!r}")
    members = s.get("members")
    for key in ("step", "epoch", "train_chars", "val_bpc", "best_val_bpc", "device", "precision", "elapsed"):
        if key in s:
            # an ensemble's steps, epochs and seconds are its members' added up
            label = {"step": "steps", "epoch": "epochs"}.get(key, key) + " (all members)" \
                if members and key in ("step", "epoch", "elapsed") else key
            click.echo(f"{label}: {s[key]}")
    if isinstance(s.get("best"), dict) and "val_macro_f1" in s["best"]:
        click.echo(f"best validation: macro-F1 {s['best']['val_macro_f1']}, accuracy {s['best'].get('val_accuracy')}")
    if members:
        click.echo(f"ensemble: {len(members)} members, mean probability; "
                   + ", ".join(f"seed {m['seed']} macro-F1 {m['best_val_f1']}" for m in members))
    t = ck.config.get("training", {})
    if t.get("optimizer"):
        decay = s.get("weight_decay", t.get("weight_decay"))
        if decay is None:  # not set: the optimizer's own default was used
            decay = default_weight_decay(t["optimizer"])
        click.echo(f"optimizer: {t['optimizer']} lr {t.get('lr')}, weight decay {decay}"
                   + (f" (ramp over {t['weight_decay_ramp']} planned epochs)" if t.get("weight_decay_ramp") else ""))
    # a validation that diverged is logged as null (metrics.jsonl holds valid JSON only)
    shown = ", ".join(f"{r.get('step')}: " + ("not finite" if r[score] is None else f"{r[score]:.3f}") for r in vals[-12:])
    if vals and classifier is not None:
        click.echo(f"validation history (step: macro-F1): {shown}")
    elif vals:
        click.echo(f"validation history (step: bpc): {shown}")


def _count(n) -> str:
    """``12,345``, or ``?`` for a count the checkpoint does not record."""
    return f"{n:,}" if isinstance(n, int) else "?"


def _classifier_lines(c: dict) -> list[str]:
    """What ``charnn info`` says of a classifier's settings (its config's ``classifier`` section)."""
    classes = c.get("classes") or []
    shown = ", ".join(repr(x) for x in classes[:20]) + (f", ... ({len(classes) - 20} more)" if len(classes) > 20 else "")
    kind = "multi-label" if c.get("multi_label") else "single-label"
    direction = "bidirectional" if c.get("bidirectional") else "unidirectional"
    cut, part = c.get("max_chars"), {"both": "head and tail"}.get(c.get("truncation"), c.get("truncation"))
    keeps = (f"truncation: {c.get('truncation')} (a text longer than {cut:,} characters keeps its {part})" if cut
             else "truncation: none (texts are never cut)")
    return [
        f"classifier: {len(classes)} classes, {kind}: {shown}",
        f"encoder: {direction}, {c.get('pooling')} pooling of {'every layer' if c.get('pool_layers') == 'all' else 'the top layer'}, "
        f"head dropout {c.get('head_dropout')}",
        *(["input: each text framed by newlines (read as a line of the language model's corpus)"] if c.get("frame") else []),
        keeps,
        _language_models_line(c.get("init_from")),
    ]


def _language_models_line(init_from) -> str:
    if not init_from:
        return "language model: none (the encoder was trained from scratch)"
    if isinstance(init_from, list):
        return f"language models: {', '.join(init_from)} (one per ensemble member, in turn)"
    return f"language model: {init_from}"


@main.command("plot")
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("-o", "--output", type=click.Path(), help="PNG file.  [default: RUN/curves.png, replaced each time]")
@click.option("--force", is_flag=True, help="Replace the --output file if it exists.")
def plot_cmd(checkpoint, output, force):
    """A PNG of the training and validation curves (needs the 'plot' extra)."""
    from .. import checkpoint as ckpt
    from ..plotting import plot_curves

    path = ckpt.resolve_checkpoint(checkpoint)
    run_dir = ckpt.run_of(path)
    if run_dir is None:
        raise CharnnError(f"{path} is a checkpoint saved on its own, without its run's training history; plot the run "
                          "directory it was trained in")
    refuse_to_replace(output, force, "--output")
    path = plot_curves(run_dir, output)
    click.echo(f"wrote {path}", err=True)
