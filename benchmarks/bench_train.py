"""charnn train with its defaults vs a textbook PyTorch char-LSTM, same corpus, same budget.

Runs both, one after the other, in one invocation, each in its own process so
peak memory is measured per run:

(a) ``charnn train CORPUS --time BUDGET`` with no other options (the defaults
    for this device and budget);
(b) a textbook char-LSTM: 2 layers of 256, embedding -> nn.LSTM -> linear,
    random chunks with zero initial state, Adam lr 2e-3, clip 5, constant rate.

Both are scored with the same full-validation pass (last 10% of the corpus,
carried state) in bits per character. Then both train for a short while at
equal model size (2x256 LSTM) to compare training throughput.

    python benchmarks/bench_train.py                      # 10 minutes each
    python benchmarks/bench_train.py --budget 60 --json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charnn.cli import OneLineArgumentParser
from charnn.errors import CharnnError

sys.path.insert(0, str(Path(__file__).parent))
from _args import positive_float  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"
CHECKPOINTS = (120, 300, 600)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- (a) charnn ---------------------------------------------------------------------------------
def run_charnn(corpus: str, budget: float, out: str, extra: dict) -> dict:
    from charnn import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(corpus=[corpus], time_budget=budget, out=out, quiet=True, **extra))
    result = trainer.fit()
    from charnn import checkpoint as ckpt

    evals = [(r["elapsed"], r["val_bpc"]) for r in ckpt.read_metrics(out) if "val_bpc" in r]
    m = trainer.model_config
    return {
        "model": f"{m.layers}x{m.hidden} {m.cell}", "parameters": trainer.model.num_parameters(),
        "settings": {k: getattr(trainer.cfg, k) for k in ("batch_size", "seq_len", "lr", "optimizer", "weight_decay",
                                                          "weight_decay_ramp", "dropout", "schedule")},
        "weight_decay_used": result.weight_decay, "planned_epochs": trainer.planned_epochs,
        "precision": trainer.precision, "evals": evals, "final_val_bpc": result.last_val_bpc,
        "best_val_bpc": result.best_val_bpc, "train_chars_per_sec": result.train_chars_per_sec,
        "steps": result.steps, "epochs": result.epochs, "elapsed": result.elapsed,
    }


# -- (b) the textbook baseline ---------------------------------------------------------------------
def run_textbook(corpus: str, budget: float, batch_size: int = 64, seq_len: int = 100, seed: int = 1234) -> dict:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from charnn.data import load_corpus
    from charnn.model import bits_per_char
    from charnn.training import evaluate

    torch.manual_seed(seed)
    data = load_corpus([corpus], val_fraction=0.1)
    train_ids = torch.from_numpy(data.train.astype(np.int64))
    vocab_size = len(data.vocab)

    class TextbookLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, 64)
            self.lstm = nn.LSTM(64, 256, num_layers=2, batch_first=True)
            self.head = nn.Linear(256, vocab_size)

        def forward(self, ids, state=None):
            out, state = self.lstm(self.embed(ids), state)
            return self.head(out), state

    model = TextbookLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    evals, chars, train_seconds, steps = [], 0, 0.0, 0
    pending = [t for t in CHECKPOINTS if t < budget] + [budget]
    start = time.perf_counter()
    while pending:
        t0 = time.perf_counter()
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (batch_size,))
        rows = starts[:, None] + torch.arange(seq_len + 1)
        chunk = train_ids[rows]
        logits, _ = model(chunk[:, :-1])  # zero initial state every batch
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        train_seconds += time.perf_counter() - t0
        chars += batch_size * seq_len
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= pending[0]:  # the model as of this mark (the first step boundary past it)
            nats, _ = evaluate(model, data.val)
            evals.append((pending.pop(0), bits_per_char(nats)))
    return {
        "model": "2x256 lstm (textbook)", "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {"batch_size": batch_size, "seq_len": seq_len, "lr": 2e-3, "schedule": "constant"},
        "precision": "fp32", "evals": evals, "final_val_bpc": evals[-1][1], "best_val_bpc": min(v for _, v in evals),
        "train_chars_per_sec": chars / train_seconds, "steps": steps, "elapsed": time.perf_counter() - start,
    }


# -- orchestration --------------------------------------------------------------------------------------
def worker(args) -> None:
    if args.worker == "charnn":
        report = run_charnn(args.corpus, args.budget, args.out, json.loads(args.extra))
    else:
        report = run_textbook(args.corpus, args.budget)
    report["peak_rss_mb"] = peak_rss_mb()
    Path(args.report).write_text(json.dumps(report))


def spawn(kind: str, corpus: str, budget: float, tmp: Path, extra: dict | None = None) -> dict:
    report = tmp / f"{kind}-{len(list(tmp.iterdir()))}.json"
    out = tmp / f"run-{report.stem}"
    cmd = [sys.executable, __file__, "--worker", kind, "--corpus", corpus, "--budget", str(budget),
           "--out", str(out), "--report", str(report), "--extra", json.dumps(extra or {})]
    done = subprocess.run(cmd)  # the worker prints its own error, if any, to this terminal
    if done.returncode != 0:
        print(f"error: the {kind} worker failed (exit code {done.returncode}; its message is above)", file=sys.stderr)
        sys.exit(done.returncode if done.returncode > 0 else 1)
    return json.loads(report.read_text())


def value_at(evals: list, t: float, budget: float) -> float | None:
    """The last validation figure measured at or before ``t`` seconds (the final one at the budget)."""
    before = [v for e, v in evals if e <= t + 1e-6 or t >= budget]
    return before[-1] if before else None


def main() -> None:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--budget", type=positive_float, default=600, help="seconds per run (default 600)")
    p.add_argument("--speed-budget", type=positive_float, default=60, help="seconds per equal-size throughput run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--keep", help="copy charnn's run directory here")
    p.add_argument("--worker", choices=["charnn", "textbook"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:
            return worker(args)
        except CharnnError as e:  # a user's mistake (a corpus too short, ...): one line, not a traceback
            sys.exit(f"error: {e}")
    if not Path(args.corpus).exists():
        p.error(f"corpus {args.corpus} not found; pass --corpus FILE")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        charnn = spawn("charnn", args.corpus, args.budget, tmp)
        if args.keep:
            import shutil

            shutil.copytree(tmp / "run-charnn-0", args.keep, dirs_exist_ok=True)
        textbook = spawn("textbook", args.corpus, args.budget, tmp)
        same_size = spawn("charnn", args.corpus, args.speed_budget, tmp,
                          {"layers": 2, "hidden": 256, "embed_dim": 64, "batch_size": 64, "seq_len": 100})
        textbook_speed = spawn("textbook", args.corpus, args.speed_budget, tmp)
    marks = [t for t in CHECKPOINTS if t <= args.budget] or [args.budget]
    result = {
        "corpus": args.corpus, "budget_s": args.budget, "threads": os.cpu_count(),
        "charnn": {**charnn, "val_bpc_at": {str(t): value_at(charnn["evals"], t, args.budget) for t in marks}},
        "textbook": {**textbook, "val_bpc_at": {str(t): value_at(textbook["evals"], t, args.budget) for t in marks}},
        "equal_size_chars_per_sec": {"charnn_2x256": same_size["train_chars_per_sec"],
                                     "textbook_2x256": textbook_speed["train_chars_per_sec"],
                                     "ratio": same_size["train_chars_per_sec"] / textbook_speed["train_chars_per_sec"]},
    }
    result["bpc_advantage"] = result["textbook"]["final_val_bpc"] - result["charnn"]["final_val_bpc"]
    result["bpc_advantage_best"] = result["textbook"]["best_val_bpc"] - result["charnn"]["best_val_bpc"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"corpus {args.corpus}, {args.budget:.0f} s per run")
    print(f"{'':10} {'model':22} {'params':>9} " + " ".join(f"{'bpc@' + str(t) + 's':>10}" for t in marks)
          + f" {'final':>7} {'best':>7} {'chars/s':>9} {'peak MB':>8}")
    for name in ("charnn", "textbook"):
        r = result[name]
        cells = " ".join(f"{r['val_bpc_at'][str(t)]:10.4f}" if r["val_bpc_at"][str(t)] else f"{'-':>10}" for t in marks)
        print(f"{name:10} {r['model']:22} {r['parameters']:9,} {cells} {r['final_val_bpc']:7.4f} {r['best_val_bpc']:7.4f} "
              f"{r['train_chars_per_sec']:9,.0f} {r['peak_rss_mb']:8.0f}")
    s = result["equal_size_chars_per_sec"]
    print(f"advantage: {result['bpc_advantage']:.4f} bpc; equal-size (2x256) throughput: charnn "
          f"{s['charnn_2x256']:,.0f} vs textbook {s['textbook_2x256']:,.0f} chars/s (x{s['ratio']:.2f})")


if __name__ == "__main__":
    main()
