"""``charnn sample``: generate text from a trained model."""

from __future__ import annotations

import json
import sys
import warnings

import click

from . import main


def _stderr(message: str) -> None:
    click.echo(message, err=True)


@main.command("sample")
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--seed", "seed_text", metavar="TEXT", help="Text to continue.  [default: start after a newline]")
@click.option("--length", "-n", type=int, default=500, show_default=True, help="Characters to generate per sample.")
@click.option("--temperature", "-t", type=float, default=1.0, show_default=True,
              help="Below 1: safer, more repetitive; above 1: wilder; 0: greedy (always the likeliest).")
@click.option("--top-k", type=int, help="Draw only from the K likeliest characters.")
@click.option("--top-p", type=float, help="Draw only from the likeliest characters that together hold probability P.")
@click.option("--num-samples", type=int, default=1, show_default=True, help="Samples generated together as one batch.")
@click.option("--stop", multiple=True, metavar="STRING",
              help="End a sample where this string appears (not printed); repeatable. Newline in bash: $'\\n'.")
@click.option("--random-seed", type=int, help="Same seed, same output. The first sample uses seed S, the next S+1, ...  [default: random]")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object with each sample and its average log-probability.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--last", is_flag=True, help="Use the run's last model rather than its best.")
@click.option("--strict", is_flag=True, help="Seed characters the model does not know are an error, not a warning.")
@click.option("--allow-unknown", is_flag=True, help="Let the model generate its unknown symbol.")
@click.option("--hide-seed", is_flag=True, help="Print only the generated text, not the seed before it.")
@click.option("--device", default="cpu", show_default=True, help="cpu (fastest for small models), cuda, mps or auto.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="CPU generation arithmetic: bf16 weights (as charnn trains on CPUs; auto where the CPU has "
                   "bf16 instructions) or fp32.")
def sample_cmd(checkpoint, seed_text, length, temperature, top_k, top_p, num_samples, stop, random_seed, fmt, as_json,
               last, strict, allow_unknown, hide_seed, device, precision):
    """Generate text from a trained model (CHECKPOINT: a run or checkpoint directory; default: the latest run).

    Characters stream to the terminal as they are produced. Several samples
    (--num-samples) are generated as one batch and printed one after another.

    \b
    Examples:
      charnn sample --seed 'ROMEO:' --length 300 --temperature 0.8
      charnn sample checkpoints/shakespeare --num-samples 4 --top-p 0.9 --stop $'\\n\\n'
      charnn sample --seed 'def ' --temperature 0 --format json
    """
    from .. import checkpoint as ckpt
    from ..lm import LanguageModel
    from ..sampling import SamplingOptions

    fmt = "json" if as_json else fmt
    options = SamplingOptions(length=length, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                              num_samples=num_samples, random_seed=random_seed, allow_unknown=allow_unknown,
                              logprobs=fmt == "json", precision=precision)
    which = "last" if last else "best"
    if checkpoint is None:
        checkpoint = ckpt.resolve_checkpoint(None, which, kind="language-model")
        _stderr(f"sampling from {checkpoint}")
    lm = LanguageModel.from_checkpoint(checkpoint, which=which, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = lm.sampler(seed_text, strict=strict, **{k: getattr(options, k) for k in options.__dataclass_fields__})
    for w in caught:
        _stderr(f"warning: {w.message}")
    if fmt == "json":
        _print_json(run, lm, checkpoint)
    elif num_samples == 1:
        if random_seed is None:
            _stderr(f"random seed {run.base_seed} (repeat with --random-seed {run.base_seed})")
        _stream_text(run, "" if hide_seed else run.seed)
    else:
        _print_batch(run, "" if hide_seed else run.seed)


def _stream_text(run, prefix: str) -> None:
    """One sample: write it as it is produced (flushing every piece on a terminal)."""
    out = sys.stdout
    live = out.isatty()
    last = prefix[-1:]
    try:
        out.write(prefix)
        for _, piece in run:
            out.write(piece)
            if live:
                out.flush()
            last = piece[-1]
        if last != "\n":
            out.write("\n")
        out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        sys.exit(130)
    except BrokenPipeError:  # e.g. | head: the reader has gone
        sys.stderr.close()
        sys.exit(0)


def _print_batch(run, prefix: str) -> None:
    samples = run.run()
    total = len(samples)
    parts = []
    for s in samples:
        stop = f", stopped at {s.stop!r}" if s.stop is not None else ""
        parts.append(f"=== sample {s.index + 1}/{total} (random seed {s.random_seed}{stop}) ===\n")
        body = prefix + s.text
        parts.append(body if body.endswith("\n") else body + "\n")
    click.echo("".join(parts), nl=False)


def _print_json(run, lm, checkpoint) -> None:
    samples = run.run()
    o = run.options
    report = {
        "checkpoint": str(lm.checkpoint_path or checkpoint),
        "seed": run.seed,
        "options": {"length": o.length, "temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p,
                    "stop": list(o.stop), "num_samples": o.num_samples, "random_seed": run.base_seed,
                    "allow_unknown": o.allow_unknown, "precision": o.precision},
        "engine": run.engine,
        "samples": [s.to_dict() for s in samples],
        "chars_generated": run.chars_generated,
        "elapsed_s": run.elapsed,
        "chars_per_sec": run.chars_generated / run.elapsed if run.elapsed > 0 else None,
    }
    click.echo(json.dumps(report, ensure_ascii=False))
