"""Generation speed: charnn's sampler against a textbook per-step loop and a naive re-reading loop.

The model is the default CPU model (``--preset small``: 2x256 LSTM, embedding
64) with random weights and a 65-symbol vocabulary: speed does not depend on
what the weights say. Everything is measured in this one invocation:

* ``charnn``: ``LanguageModel.sample`` -- the path ``charnn sample`` takes:
  the seed primed in one pass, then the native kernel (``charnn.native``:
  the step and the temperature draw in C, bf16 weights where the CPU has
  bf16 dot products) for blocks of characters, stop-string checks and
  decoding; also with ``precision="fp32"`` (``charnn, fp32 kernel``) and with
  the native kernel switched off (``charnn, NumPy stepper``: the
  :class:`charnn.inference.Stepper` loop, the path without a C compiler);
* ``charnn stepper``: ``Stepper.step_arrays`` alone (the per-step cost): BLAS
  on one thread; batches of ``PART_ROWS`` rows or more split by hidden units
  into parts run on parallel threads when that is faster; for comparison,
  unsplit on one thread, and unsplit on a BLAS using every core;
* ``matrix products only``: just the step's weight products (one thread), the
  floor for any float32 step: at batch 1 they read 3 MB of weights per step;
* ``textbook``: per character, ``nn.Embedding`` + ``nn.LSTM`` + ``nn.Linear``
  + ``softmax`` + ``torch.multinomial`` on the same weights, carrying the
  LSTM state (PyTorch's default threads, ``torch.no_grad``); also with
  PyTorch on one thread;
* ``naive``: per character, the whole model over the whole text so far.

Each figure is the best of ``--repeats`` runs (the machine is shared); the
naive loop, orders of magnitude slower, runs once. ``--checkpoint`` adds a
check that bf16 generation does not change a trained model: its bits per
character on the last 10% of ``--text`` through each engine's step.
Usage::

    flock /tmp/charnn-bench.lock python benchmarks/bench_sample.py [--json]
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from charnn.cli import OneLineArgumentParser
from charnn.errors import CharnnError
from charnn.inference import Stepper, blas_threads
from charnn.lm import LanguageModel
from charnn.model import CharRNN, ModelConfig
from charnn.vocab import Vocabulary

sys.path.insert(0, str(Path(__file__).parent))
from _args import at_least_one  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"

CHARS = "\n" + "".join(chr(c) for c in range(32, 95))  # newline + 63 printable characters + unknown = 65


def build_model(vocab_size: int) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=vocab_size, cell="lstm", layers=2, hidden=256, embed_dim=64)).eval()


def flops_per_char(c: ModelConfig) -> float:
    """Multiply-adds x 2 of one LSTM step plus the output layer (as a textbook model computes them)."""
    macs = 0
    for k in range(c.layers):
        in_dim = c.input_dim if k == 0 else c.hidden
        macs += (in_dim + c.hidden) * 4 * c.hidden
    macs += c.hidden * c.vocab_size
    return 2.0 * macs


def best_of(repeats: int, fn) -> float:
    """Shortest wall time of ``repeats`` calls of ``fn`` (after a warm-up call when repeating)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def textbook(model: CharRNN, batch: int, length: int) -> None:
    """The per-step loop of a typical char-RNN tutorial."""
    x = torch.zeros(batch, 1, dtype=torch.long)
    state = None
    with torch.no_grad():
        for _ in range(length):
            out, state = model.rnn(model.embed(x), state)
            probs = torch.softmax(model.head(out[:, -1]), -1)
            x = torch.multinomial(probs, 1)


def textbook_one_thread(model: CharRNN, batch: int, length: int) -> None:
    """The textbook loop with PyTorch limited to one thread (faster at batch 1 on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        textbook(model, batch, length)
    finally:
        torch.set_num_threads(before)


def naive(model: CharRNN, batch: int, length: int) -> None:
    """Re-read the whole text at every step."""
    text = torch.zeros(batch, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(length):
            logits, _ = model(text)
            nxt = torch.multinomial(torch.softmax(logits[:, -1], -1), 1)
            text = torch.cat([text, nxt], 1)


PRIME = {}  # the last charnn run's (prime seconds, steps) per batch


ENGINES = {}  # what generated each charnn row: native-bf16, native-fp32 or numpy


def charnn_sample(lm: LanguageModel, batch: int, length: int, precision: str = "auto", numpy: bool = False,
                  method: str = "charnn") -> None:
    """``LanguageModel.sample`` as ``charnn sample`` runs it; ``numpy``: with the native kernel switched off."""
    native = lm.stepper.native
    if numpy:
        lm.stepper.native = lambda *a, **k: None
    try:
        run = lm.sampler("\n", num_samples=batch, length=length, random_seed=0, logprobs=False, precision=precision)
        samples = run.run()
    finally:
        lm.stepper.native = native
    assert sum(len(s.text) for s in samples) == batch * length
    ENGINES[method] = run.engine
    if method == "charnn":
        PRIME[batch] = (run.prime_seconds, run.elapsed)


def precision_check(checkpoint: str, text_path: str, val_fraction: float = 0.1, streams: int = 16,
                    lm: LanguageModel | None = None) -> dict:
    """Does bf16 generation change the model? Bits per character of the last ``val_fraction`` of
    ``text_path`` under a trained checkpoint, teacher-forced through each engine's step: the NumPy
    stepper (fp32) and the native kernel in fp32 and bf16 (``streams`` contiguous streams, zero start);
    ``lm``: the checkpoint's model, when already loaded."""
    from charnn import native as nat  # noqa: PLC0415

    lm = lm if lm is not None else LanguageModel.from_checkpoint(checkpoint)
    text = Path(text_path).read_text(encoding="utf-8")
    ids = lm.vocab.encode(text[int(len(text) * (1 - val_fraction)):]).astype(np.int64)
    per = (len(ids) - 1) // streams
    x = np.stack([ids[i * per:(i + 1) * per] for i in range(streams)])
    y = np.stack([ids[i * per + 1:(i + 1) * per + 1] for i in range(streams)])
    stepper = lm.stepper
    engines = {"numpy stepper, fp32": stepper.step_arrays}
    for precision in ("fp32", "bf16"):
        if stepper.native(precision) is not None and (precision == "fp32" or nat.supports_bf16()):
            engines[f"native kernel, {precision}"] = stepper.native(precision).step
    report = {"checkpoint": checkpoint, "text": text_path, "chars": int(x.size), "streams": streams, "bpc": {}}
    rows = np.arange(streams)
    for name, step in engines.items():
        state, nats = stepper.initial_state(streams), 0.0
        for t in range(per):
            logits, state = step(x[:, t], state)
            z = logits.astype(np.float64)
            m = z.max(axis=1)
            nats -= float((z[rows, y[:, t]] - m - np.log(np.exp(z - m[:, None]).sum(axis=1))).sum())
        report["bpc"][name] = nats / x.size / math.log(2)
    return report


def stepper_only(stepper: Stepper, batch: int, steps: int, how: str = "default") -> None:
    """``default``: ``step_arrays`` as the sampler calls it; ``unsplit``: large batches not split
    by hidden units, one thread; ``unsplit, all BLAS threads``: the same on a BLAS using every core."""
    state = stepper.initial_state(batch)
    ids = np.zeros(batch, dtype=np.intp)
    parts_for = stepper._parts_for
    if how != "default":
        stepper._parts_for = lambda b: 1
    try:
        with blas_threads(os.cpu_count() if how == "unsplit, all BLAS threads" else 1):
            for _ in range(steps):
                _, state = stepper.step_arrays(ids, state)
    finally:
        stepper._parts_for = parts_for


def products_only(stepper: Stepper, batch: int, steps: int) -> None:
    """Only the matrix products of ``steps`` steps (layer 0 recurrent, each upper layer, output layer):
    the weights every step must read, a lower bound for a float32 step."""
    part = stepper._get_parts(1)[0]
    h = np.zeros((batch, stepper.hidden), dtype=np.float32)
    xh = np.ones((batch, part.w_in[1].shape[0]), dtype=np.float32)
    out = np.ones((batch, stepper.hidden + 1), dtype=np.float32)
    g = np.empty((batch, part.w_rec[0].shape[1]), dtype=np.float32)
    logits = np.empty((batch, stepper.vocab_size), dtype=np.float32)
    with blas_threads(1):
        for _ in range(steps):
            np.matmul(h, part.w_rec[0], out=g)
            for w in part.w_in[1:]:
                np.matmul(xh, w, out=g)
            np.matmul(out, stepper._w_out, out=logits)


def measure(args, trained: LanguageModel | None = None) -> dict:
    """Every timing; ``trained``: the ``--checkpoint`` model, loaded (and so checked) before measuring."""
    vocab = Vocabulary(CHARS)
    model = build_model(len(vocab))
    lm = LanguageModel(model, vocab)
    stepper = lm.stepper
    lengths = {  # characters per sample (per row) for each method and batch
        ("charnn", 1): args.length, ("charnn", 64): max(args.length // 4, 1),
        ("charnn, fp32 kernel", 1): args.length, ("charnn, fp32 kernel", 64): max(args.length // 4, 1),
        ("charnn, NumPy stepper", 1): args.length, ("charnn, NumPy stepper", 64): max(args.length // 4, 1),
        ("charnn stepper", 1): args.length, ("charnn stepper", 64): max(args.length // 4, 1),
        ("stepper, unsplit", 64): max(args.length // 4, 1),
        ("matrix products only", 1): args.length, ("matrix products only", 64): max(args.length // 4, 1),
        ("stepper, unsplit, all BLAS threads", 1): args.length,
        ("stepper, unsplit, all BLAS threads", 64): max(args.length // 4, 1),
        ("textbook", 1): max(args.length // 10, 1), ("textbook", 64): max(args.length // 20, 1),
        ("textbook, 1 torch thread", 1): max(args.length // 10, 1),
        ("textbook, 1 torch thread", 64): max(args.length // 20, 1),
        ("naive", 1): args.naive_length, ("naive", 64): args.naive_length,
    }
    runners = {
        "charnn": lambda b, n: charnn_sample(lm, b, n),
        "charnn, fp32 kernel": lambda b, n: charnn_sample(lm, b, n, "fp32", method="charnn, fp32 kernel"),
        "charnn, NumPy stepper": lambda b, n: charnn_sample(lm, b, n, numpy=True, method="charnn, NumPy stepper"),
        "charnn stepper": lambda b, n: stepper_only(stepper, b, n),
        "stepper, unsplit": lambda b, n: stepper_only(stepper, b, n, "unsplit"),
        "stepper, unsplit, all BLAS threads": lambda b, n: stepper_only(stepper, b, n, "unsplit, all BLAS threads"),
        "matrix products only": lambda b, n: products_only(stepper, b, n),
        "textbook": lambda b, n: textbook(model, b, n),
        "textbook, 1 torch thread": lambda b, n: textbook_one_thread(model, b, n),
        "naive": lambda b, n: naive(model, b, n),
    }
    rows = []
    for batch in (1, 64):
        for method, run in runners.items():
            if (method, batch) not in lengths:
                continue
            n = lengths[(method, batch)]
            seconds = best_of(1 if method == "naive" else args.repeats, lambda: run(batch, n))
            row = {"method": method, "batch": batch, "chars_per_row": n, "seconds": seconds,
                   "chars_per_sec": batch * n / seconds, "latency_us": seconds / n * 1e6}
            if method in ENGINES:
                row["engine"] = ENGINES[method]
            if method == "charnn":  # the same run without reading the seed (the one-off fused-kernel call)
                prime, total = PRIME[batch]
                row["prime_seconds"] = prime
                row["steady_chars_per_sec"] = batch * n / (total - prime)
                row["steady_latency_us"] = (total - prime) / n * 1e6
            rows.append(row)
    by = {(r["method"], r["batch"]): r for r in rows}
    fpc = flops_per_char(model.config)
    return {
        "model": "2x256 LSTM, embedding 64, vocabulary 65 (random weights)",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": np.__version__},
        "repeats": args.repeats, "naive_length": args.naive_length,
        "results": rows,
        "speedup_vs_textbook": {b: by[("charnn", b)]["chars_per_sec"] / by[("textbook", b)]["chars_per_sec"] for b in (1, 64)},
        "speedup_vs_textbook_one_thread": {
            b: by[("charnn", b)]["chars_per_sec"] / by[("textbook, 1 torch thread", b)]["chars_per_sec"] for b in (1, 64)},
        "speedup_vs_naive": {b: by[("charnn", b)]["chars_per_sec"] / by[("naive", b)]["chars_per_sec"] for b in (1, 64)},
        "flops_per_char": fpc,
        "gflops_at_batch_64": by[("charnn", 64)]["chars_per_sec"] * fpc / 1e9,
        "targets": {"batch1_speedup_at_least": 25, "batch64_chars_per_sec_at_least": 40000},
        "precision_check": precision_check(args.checkpoint, args.text, lm=trained) if args.checkpoint else None,
    }


def print_table(report: dict) -> None:
    print(f"{report['model']}; {report['machine']['cpus']} CPUs, torch {report['machine']['torch']} "
          f"({report['machine']['torch_threads']} threads); best of {report['repeats']}")
    print(f"{'method':<36}{'batch':>6}{'chars/row':>10}{'chars/s':>12}{'latency/char':>16}")
    for r in report["results"]:
        lat = f"{r['latency_us']:,.1f} us" if r["latency_us"] < 10_000 else f"{r['latency_us'] / 1000:,.2f} ms"
        print(f"{r['method']:<36}{r['batch']:>6}{r['chars_per_row']:>10}{r['chars_per_sec']:>12,.0f}{lat:>16}")
    for r in report["results"]:
        if r["method"] == "charnn":
            print(f"charnn at batch {r['batch']} after reading the seed ({r['prime_seconds'] * 1e3:.1f} ms): "
                  f"{r['steady_chars_per_sec']:,.0f} chars/s, {r['steady_latency_us']:,.1f} us per character")
    s, n = report["speedup_vs_textbook"], report["speedup_vs_naive"]
    s1 = report["speedup_vs_textbook_one_thread"]
    print(f"charnn vs textbook: {s[1]:.1f}x at batch 1, {s[64]:.1f}x at batch 64 "
          f"(vs the 1-thread textbook: {s1[1]:.1f}x / {s1[64]:.1f}x); "
          f"vs naive ({report['naive_length']} chars): {n[1]:.0f}x / {n[64]:.0f}x")
    print(f"batch 64: {report['gflops_at_batch_64']:.0f} GFLOP/s ({report['flops_per_char'] / 1e6:.2f} MFLOP per character)")
    engines = sorted({f"{r['method']}: {r['engine']}" for r in report["results"] if "engine" in r})
    print("engines: " + "; ".join(engines))
    check = report["precision_check"]
    if check:
        print(f"bits per character of {check['chars']:,} characters of {check['text']} under {check['checkpoint']}:")
        for name, bpc in check["bpc"].items():
            print(f"  {name:<22}{bpc:.4f}")


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=at_least_one, default=4000, help="characters per sample for charnn at batch 1")
    parser.add_argument("--naive-length", type=at_least_one, default=150, help="characters the naive loop generates")
    parser.add_argument("--repeats", type=at_least_one, default=3, help="runs of each timing; the best counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--checkpoint", help="a trained model: also compare its bpc under fp32 and bf16 generation")
    parser.add_argument("--text", default=str(DEFAULT_TEXT),
                        help="with --checkpoint: the text whose last 10%% is scored (default: tiny Shakespeare in "
                             "the shared folder beside the repository)")
    args = parser.parse_args()
    trained = None
    if args.checkpoint:  # a wrong checkpoint or text is refused now, not after minutes of timing
        if not Path(args.text).is_file():
            parser.error(f"{args.text} not found; pass --text PATH to the text the checkpoint was trained on")
        try:
            trained = LanguageModel.from_checkpoint(args.checkpoint)
        except CharnnError as e:
            parser.error(str(e))
    report = measure(args, trained)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
