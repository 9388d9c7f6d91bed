"""The seed talk's training tricks, measured: which ones matter on this hardware.

The talk behind this project (Alec Radford, "General Sequence Learning using
Recurrent Neural Networks", the Passage library) claims that gating, gradient
clipping, steeper gates, orthogonal initialisation and Adam together make RNN
training "up to 10x more efficient" and "much more stable", and that the GRU
is simpler and 1.5-1.75x faster than the LSTM. This script trains one fixed
model size on tiny Shakespeare (90/10 split) under an equal training-time
budget per configuration, starting from the naive set-up and adding one trick
at a time, cumulatively:

  1 rnn-sgd       plain tanh RNN, SGD, Gaussian init N(0, 0.05^2), no clipping
  2 +gru          gating: GRU
  3 +lstm         gating: LSTM instead (the rest of the chain builds on it)
  4 +clip         gradient-norm clipping at 5
  5 +orthogonal   orthogonal recurrent init
  6 +steep        steeper gates, sigmoid(3.75 x) (Passage's steeper_sigmoid)
  7 +adam         Adam (lr 2e-3) instead of SGD
  side rows:
    irnn            ReLU RNN with identity init (IRNN), SGD (--irnn-lr), clipping
    charnn-default  what charnn trains with: LSTM, orthogonal, clipping, Adam, slope 1
                    (so the fused library kernel)
    +layer-norm     charnn-default with layer normalisation inside charnn's own cell

The SGD learning rate is a sweep's choice (--sgd-lr-sweep): short runs of
+orthogonal pick the rate of every SGD row.

For each run it reports the validation bits per character at the budget (the
whole validation text); the optimizer steps needed to reach 2.5 bpc (checked
every --eval-every steps on the first --probe-chars characters of the
validation text) and the training seconds that took; the probe's bpc after
--compare-step steps (a figure machine load cannot move); the training speed in
chars/s; whether the run diverged (a non-finite loss, or a final bpc worse than
guessing uniformly); whether it blew up at some probe (worse than uniform, even
if it recovered) and its worst probe bpc. The budget counts training time
only: the periodic probes are timed and left out, so frequent probing costs no
configuration anything.

Then a speed section: training-step chars/s of the library kernels (LSTM,
GRU, RNN) and of charnn's own cell (steep gates, layer norm), measured
interleaved in one process so machine load affects them alike, as ratios
against the library LSTM.

    flock /tmp/charnn-bench.lock python benchmarks/tricks.py --budget 180 --sgd-lr-sweep 0.3,1,3,10
    python benchmarks/tricks.py --budget 10 --rows rnn-sgd,+adam --no-speed   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from charnn.cli import OneLineArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from _args import at_least, at_least_one, comma_list, positive_float  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
TARGET_BPC = 2.5

# Fixed for every row: the model size and the data pipeline.
BASE = dict(layers=1, hidden=256, embed_dim=64, dropout=0.0, embed_dropout=0.0, tie_weights=False, forget_bias=1.0,
            batch_size=32, seq_len=128, warmup_steps=100, schedule="cosine", val_fraction=0.1,
            average_last=0.0)  # the rows score the weights being trained, not an average of them
SGD = dict(optimizer="sgd", lr=1.0, momentum=0.0, nesterov=False)
ADAM = dict(optimizer="adam", lr=2e-3)

# (name, what it adds, overrides of the previous row); each row starts from the one before it.
CHAIN = [
    ("rnn-sgd", "plain tanh RNN, SGD, Gaussian init, no clipping",
     dict(cell="rnn", activation="tanh", init="gaussian", gate_slope=1.0, layer_norm=False, grad_clip=0.0, **SGD)),
    ("+gru", "gating: GRU", dict(cell="gru")),
    ("+lstm", "gating: LSTM instead of GRU", dict(cell="lstm")),
    ("+clip", "gradient clipping (norm 5)", dict(grad_clip=5.0)),
    ("+orthogonal", "orthogonal recurrent init", dict(init="orthogonal")),
    ("+steep", "steeper gates, slope 3.75", dict(gate_slope=3.75)),
    ("+adam", "Adam, lr 2e-3", dict(ADAM)),
]
EXTRA = [
    ("irnn", "side row: ReLU RNN, identity init, SGD, clipping",
     dict(cell="rnn", activation="relu", init="identity", gate_slope=1.0, layer_norm=False, grad_clip=5.0, **SGD)),
    ("charnn-default", "side row: LSTM, orthogonal, clip, Adam, slope 1",
     dict(cell="lstm", activation="tanh", init="orthogonal", gate_slope=1.0, layer_norm=False, grad_clip=5.0, **ADAM)),
    ("+layer-norm", "side row: charnn-default with layer norm in the cell",
     dict(cell="lstm", activation="tanh", init="orthogonal", gate_slope=1.0, layer_norm=True, grad_clip=5.0, **ADAM)),
]


def row_configs(sgd_lr: float = SGD["lr"], irnn_lr: float | None = None) -> list[tuple[str, str, dict]]:
    """Every row with its complete settings (the chain is cumulative); ``irnn_lr`` None: ``sgd_lr``."""
    rows, current = [], {}
    for name, adds, overrides in CHAIN:
        current = {**current, **overrides}
        rows.append((name, adds, dict(current)))
    rows += [(name, adds, dict(overrides)) for name, adds, overrides in EXTRA]
    for name, _, settings in rows:
        if settings["optimizer"] == "sgd":
            settings["lr"] = irnn_lr if name == "irnn" and irnn_lr is not None else sgd_lr
    return rows


# -- one training run (in a worker process) ---------------------------------------------------------
def run_one(name: str, settings: dict, seed: int, budget: float, corpus: str, threads: int, eval_every: int,
            probe_chars: int) -> dict:
    """Train one configuration for ``budget`` seconds of training time; return its figures."""
    import torch

    torch.set_num_threads(threads)
    from charnn.model import bits_per_char
    from charnn.training import Trainer, TrainConfig, evaluate

    class ProbeTrainer(Trainer):
        """Validates on a fixed probe of the validation text, leaves probe time out of the budget,
        and skips checkpoint writing (not what is measured here)."""

        probe_seconds = 0.0
        probes: list = []

        def validate(self):
            t0 = time.perf_counter()
            nats, _ = evaluate(self.model, self.corpus.val[:probe_chars], device=self.device,
                               precision=self.precision, seq_len=128)
            bpc = bits_per_char(nats)
            self.probes.append((self.step, round(self.train_seconds, 2), round(bpc, 4)))
            self.probe_seconds += time.perf_counter() - t0
            return bpc

        def _elapsed(self):
            return super()._elapsed() - self.probe_seconds

        def save(self, which):
            return self.run_dir / which

    with tempfile.TemporaryDirectory(prefix="charnn-tricks-") as tmp:
        cfg = TrainConfig(corpus=[corpus], **BASE, **settings, seed=seed, time_budget=budget, eval_every=eval_every,
                          patience=None, precision="fp32", device="cpu", out=str(Path(tmp) / "run"), quiet=True,
                          log_every=10**9)
        trainer = ProbeTrainer(cfg)
        trainer.probes = []
        result = trainer.fit()
        nats, _ = evaluate(trainer.model, trainer.corpus.val, device="cpu", seq_len=128)
    final = bits_per_char(nats)
    uniform = math.log2(len(trainer.corpus.vocab))
    reached = next((step for step, _, bpc in trainer.probes if bpc <= TARGET_BPC), None)
    diverged = result.stop_reason == "diverged" or not math.isfinite(final) or final > uniform
    return {
        "row": name, "seed": seed, "settings": settings, "val_bpc": round(final, 4) if math.isfinite(final) else None,
        "steps_to_2_5": reached,
        "train_seconds_to_2_5": next((s for _, s, bpc in trainer.probes if bpc <= TARGET_BPC), None),
        "worst_probe_bpc": max((bpc for _, _, bpc in trainer.probes if math.isfinite(bpc)), default=None),
        "steps": result.steps, "epochs": round(result.epochs, 3), "chars_per_sec": round(result.train_chars_per_sec),
        "diverged": diverged, "stop_reason": result.stop_reason, "probes": trainer.probes,
        "blew_up": any(not math.isfinite(bpc) or bpc > uniform for _, _, bpc in trainer.probes),
        "parameters": trainer.model.num_parameters(),
    }


def run_all(pool, jobs: list[tuple[str, dict, int]], budget: float, args, desc: str) -> list[dict]:
    """Run ``(row, settings, seed)`` jobs on the worker pool, with a progress bar."""
    from tqdm.auto import tqdm

    futures = [pool.submit(run_one, name, settings, seed, budget, args.corpus, args.threads, args.eval_every,
                           args.probe_chars) for name, settings, seed in jobs]
    for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, file=sys.stderr):
        pass
    return [f.result() for f in futures]


def sweep_sgd_lr(pool, args) -> list[dict]:
    """Short runs of +orthogonal (and, for information, rnn-sgd) at each --sgd-lr-sweep rate;
    sets ``args.sgd_lr`` to +orthogonal's best."""
    rates = [float(r) for r in args.sgd_lr_sweep.split(",")]
    jobs = [(name, settings, 1234) for lr in rates for name, _, settings in row_configs(lr)
            if name in ("+orthogonal", "rnn-sgd")]
    runs = run_all(pool, jobs, args.sweep_budget, args, "SGD learning-rate sweep")
    table = [{"row": r["row"], "lr": r["settings"]["lr"], "val_bpc": r["val_bpc"], "diverged": r["diverged"],
              "steps": r["steps"]} for r in runs]
    ok = [t for t in table if t["row"] == "+orthogonal" and not t["diverged"] and t["val_bpc"] is not None]
    if ok:
        args.sgd_lr = min(ok, key=lambda t: t["val_bpc"])["lr"]
    return table


# -- speed: library kernels vs charnn's own cell -----------------------------------------------------
def _lstm_step(x_t, h, c, w_t, scale):
    """One steep-gated LSTM step (autograd), the unit torch.compile fuses in the comparison variant."""
    import torch

    a = torch.addmm(x_t, h, w_t) * scale
    i, f, g, o = a.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def use_compiled_step(model) -> None:
    """Swap a one-layer charnn LSTM cell's loop for a Python loop over a torch.compile'd step
    (the alternative to TorchScript that the speed section measures)."""
    import torch

    rnn, step = model.rnn, torch.compile(_lstm_step)
    assert rnn.layers == 1 and rnn.cell == "lstm"

    def forward(x, state=None):
        xp = rnn._input_projection(x, 0).transpose(0, 1)
        h = c = x.new_zeros(x.size(0), rnn.hidden)
        w_t, scale, outs = rnn.weight_hh_l0.t(), rnn._lstm_scale(xp), []
        for x_t in xp.unbind(0):
            h, c = step(x_t, h, c, w_t, scale)
            outs.append(h)
        return torch.stack(outs, 1), (h[None], c[None])

    rnn.forward = forward


def speed_section(threads_list: list[int], rounds: int, vocab: int = 65) -> dict:
    """Training-step chars/s (forward, backward, Adam), variants interleaved round by round."""
    import torch

    from charnn.model import CharRNN, ModelConfig, sequence_loss

    b, t = BASE["batch_size"], BASE["seq_len"]
    size = dict(vocab_size=vocab, layers=BASE["layers"], hidden=BASE["hidden"], embed_dim=BASE["embed_dim"])
    variants = {
        "lstm (library)": dict(cell="lstm"),
        "gru (library)": dict(cell="gru"),
        "rnn tanh (library)": dict(cell="rnn"),
        "lstm steep (charnn cell)": dict(cell="lstm", gate_slope=3.75),
        "gru steep (charnn cell)": dict(cell="gru", gate_slope=3.75),
        "lstm steep (charnn cell, eager)": dict(cell="lstm", gate_slope=3.75),
        "lstm steep (torch.compile step)": dict(cell="lstm", gate_slope=3.75),
        "lstm layer-norm (charnn cell)": dict(cell="lstm", layer_norm=True),
        "gru layer-norm (charnn cell)": dict(cell="gru", layer_norm=True),
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, vocab, (b, t), generator=g)
    y = torch.randint(1, vocab, (b, t), generator=g)
    out = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        models = {}
        for name, kw in variants.items():
            m = CharRNN(ModelConfig(**size, **kw))
            if "eager" in name:
                m.rnn.use_scripted = False
            if "torch.compile" in name:
                use_compiled_step(m)
            models[name] = (m, torch.optim.Adam(m.parameters(), 1e-3))
        times = {name: [] for name in models}
        compile_seconds = float('nan')
        for r in range(rounds + 2):
            for name, (m, opt) in models.items():
                t0 = time.perf_counter()
                logits, _ = m(x)
                loss = sequence_loss(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if r >= 2:  # two warm-up rounds (TorchScript profiles its first calls; torch.compile compiles)
                    times[name].append(time.perf_counter() - t0)
                elif r == 0 and "torch.compile" in name:
                    compile_seconds = time.perf_counter() - t0
        speeds = {name: b * t / statistics.median(v) for name, v in times.items()}
        base = speeds["lstm (library)"]
        out[str(threads)] = {name: {"chars_per_sec": round(s), "vs_lstm_library": round(s / base, 3)}
                             for name, s in speeds.items()}
        out[str(threads)]["_compile_seconds"] = round(compile_seconds, 1)
        out[str(threads)]["_ratios"] = {
            "gru/lstm (library)": round(speeds["gru (library)"] / base, 3),
            "charnn lstm/library lstm": round(speeds["lstm steep (charnn cell)"] / base, 3),
            "charnn gru/library gru": round(speeds["gru steep (charnn cell)"] / speeds["gru (library)"], 3),
            "torchscript/eager (charnn lstm)": round(speeds["lstm steep (charnn cell)"]
                                                     / speeds["lstm steep (charnn cell, eager)"], 3),
            "torchscript/torch.compile step": round(speeds["lstm steep (charnn cell)"]
                                                    / speeds["lstm steep (torch.compile step)"], 3),
        }
    return out


# -- the table ------------------------------------------------------------------------------------
def summarize(runs: list[dict], order: list[str], compare_step: int) -> list[dict]:
    """One line per row: means over seeds (steps to 2.5: mean over the seeds that reached it)."""
    lines = []
    for name in order:
        rs = [r for r in runs if r["row"] == name]
        if not rs:
            continue
        vals = [r["val_bpc"] for r in rs if r["val_bpc"] is not None and not r["diverged"]]
        reached = [r["steps_to_2_5"] for r in rs if r["steps_to_2_5"] is not None]
        at_step = [bpc for r in rs for step, _, bpc in r["probes"] if step == compare_step]
        seconds = [r["train_seconds_to_2_5"] for r in rs if r["train_seconds_to_2_5"] is not None]
        worst = [r["worst_probe_bpc"] for r in rs if r["worst_probe_bpc"] is not None]
        lines.append({
            "row": name, "seeds": len(rs),
            "val_bpc": round(statistics.mean(vals), 3) if vals else None,
            "val_bpc_per_seed": [r["val_bpc"] for r in rs],
            "steps_to_2_5": round(statistics.mean(reached)) if reached else None,
            "seconds_to_2_5": round(statistics.mean(seconds), 1) if seconds else None,
            "reached_2_5": f"{len(reached)}/{len(rs)}",
            "worst_probe_bpc": round(max(worst), 2) if worst else None,
            "probe_bpc_at_compare_step": round(statistics.mean(at_step), 3) if len(at_step) == len(rs) else None,
            "steps": round(statistics.mean(r["steps"] for r in rs)),
            "chars_per_sec": round(statistics.mean(r["chars_per_sec"] for r in rs)),
            "diverged": f"{sum(r['diverged'] for r in rs)}/{len(rs)}",
            "blew_up": f"{sum(r.get('blew_up', False) for r in rs)}/{len(rs)}",
        })
    return lines


def print_table(lines: list[dict], rows: list[tuple[str, str, dict]], args) -> None:
    adds = {name: text for name, text, _ in rows}
    print(f"tiny Shakespeare (90/10), {BASE['layers']}x{BASE['hidden']}, embed {BASE['embed_dim']}, "
          f"batch {BASE['batch_size']} x seq {BASE['seq_len']}, {args.budget:g} s training time per run, "
          f"{args.threads} thread(s) per run, {args.jobs} run(s) at a time; SGD (no momentum): lr {args.sgd_lr:g}, "
          f"irnn lr {args.irnn_lr:g}")
    at = f"bpc@{args.compare_step}"
    head = (f"{'row':<15} {'adds':<48} {'val bpc':>8} {'steps to 2.5':>13} {'s to 2.5':>8} {at:>9} {'worst bpc':>9} "
            f"{'steps':>6} {'chars/s':>8} {'diverged':>8} {'blew up':>7}")
    print(head)
    print("-" * len(head))
    for ln in lines:
        bpc = f"{ln['val_bpc']:.3f}" if ln["val_bpc"] is not None else "-"
        reach = str(ln["steps_to_2_5"]) if ln["steps_to_2_5"] is not None else "never"
        if ln["seeds"] > 1:
            reach += f" ({ln['reached_2_5']})"
        fixed, worst, secs = ln["probe_bpc_at_compare_step"], ln["worst_probe_bpc"], ln["seconds_to_2_5"]
        fixed = f"{fixed:.3f}" if fixed is not None else "-"
        worst = f"{worst:.2f}" if worst is not None else "-"
        secs = f"{secs:.0f}" if secs is not None else "-"
        print(f"{ln['row']:<15} {adds[ln['row']][:48]:<48} {bpc:>8} {reach:>13} {secs:>8} {fixed:>9} {worst:>9} "
              f"{ln['steps']:>6} {ln['chars_per_sec']:>8,} {ln['diverged']:>8} {ln['blew_up']:>7}")


def print_speed(speed: dict) -> None:
    for threads, table in speed.items():
        print(f"\ntraining-step speed, {threads} thread(s), batch {BASE['batch_size']} x seq {BASE['seq_len']}, "
              f"{BASE['layers']}x{BASE['hidden']}:")
        for name, v in table.items():
            if not name.startswith("_"):
                print(f"  {name:<34} {v['chars_per_sec']:>8,} chars/s  {v['vs_lstm_library']:.2f}x library LSTM")
        for name, ratio in table["_ratios"].items():
            print(f"  {name:<34} {ratio:.2f}x")
        print(f"  torch.compile's first step (compiling): {table['_compile_seconds']:g} s")


def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="tiny Shakespeare text")
    p.add_argument("--budget", type=positive_float, default=180.0, help="training seconds per run")
    p.add_argument("--seeds", type=at_least_one, default=1, help="seeds per row (1234, 1235, ...)")
    p.add_argument("--rows", help="comma-separated row names (default: all)")
    p.add_argument("--sgd-lr", type=positive_float, default=SGD["lr"], help="learning rate of the SGD rows")
    p.add_argument("--irnn-lr", type=positive_float, help="learning rate of the irnn row (default: --sgd-lr)")
    p.add_argument("--sgd-lr-sweep", type=comma_list(positive_float), help="comma-separated rates: first pick --sgd-lr by short runs of +orthogonal")
    p.add_argument("--compare-step", type=at_least_one, default=400, help="report the probe bpc after this many steps")
    p.add_argument("--sweep-budget", type=positive_float, default=30.0, help="training seconds per sweep run")
    p.add_argument("--threads", type=at_least_one, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=at_least_one, default=2, help="runs at a time, each in its own process")
    p.add_argument("--eval-every", type=at_least_one, default=20, help="steps between validation probes")
    p.add_argument("--probe-chars", type=at_least(2), default=32768, help="validation characters per probe")
    p.add_argument("--no-speed", action="store_true", help="skip the speed section")
    p.add_argument("--speed-only", action="store_true", help="only the speed section")
    p.add_argument("--speed-threads", type=comma_list(at_least_one), default="1,2", help="thread counts for the speed section")
    p.add_argument("--speed-rounds", type=at_least_one, default=8, help="interleaved rounds of the speed section")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if not Path(args.corpus).is_file():
        p.error(f"{args.corpus} not found; pass --corpus PATH to tiny Shakespeare")
    if args.rows:  # checked before the learning-rate sweep, not after it
        wanted = args.rows.split(",")
        names = [r[0] for r in row_configs()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            p.error(f"unknown rows {unknown}; choose from {', '.join(names)}")

    import multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the spawned workers' OpenMP pools
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"))
    sweep = None
    if args.sgd_lr_sweep and not args.speed_only:
        sweep = sweep_sgd_lr(pool, args)
    if args.irnn_lr is None:
        args.irnn_lr = args.sgd_lr
    rows = row_configs(args.sgd_lr, args.irnn_lr)
    if args.rows:
        rows = [r for r in rows if r[0] in wanted]
    report = {"corpus": args.corpus, "budget_seconds": args.budget, "threads_per_run": args.threads,
              "concurrent_runs": args.jobs, "model": {k: BASE[k] for k in ("layers", "hidden", "embed_dim")},
              "batch_size": BASE["batch_size"], "seq_len": BASE["seq_len"], "eval_every": args.eval_every,
              "probe_chars": args.probe_chars, "target_bpc": TARGET_BPC, "compare_step": args.compare_step,
              "command": " ".join(sys.argv)}
    if sweep is not None:
        report["sgd_lr_sweep"] = sweep
    if not args.speed_only:
        jobs = [(name, settings, 1234 + s) for s in range(args.seeds) for name, _, settings in rows]
        runs = run_all(pool, jobs, args.budget, args, "runs")
        report["rows"] = summarize(runs, [r[0] for r in rows], args.compare_step)
        report["sgd_lr"], report["irnn_lr"] = args.sgd_lr, args.irnn_lr
        report["runs"] = sorted(runs, key=lambda r: ([x[0] for x in rows].index(r["row"]), r["seed"]))
    pool.shutdown()
    if not args.no_speed:
        import torch

        report["speed"] = speed_section([int(t) for t in args.speed_threads.split(",")], args.speed_rounds)
        torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(report))
        return 0
    if sweep is not None:
        print(f"SGD learning rate sweep ({args.sweep_budget:g} s runs; val bpc, * = diverged): " + "; ".join(
            f"{r['row']} lr {r['lr']:g}: {r['val_bpc'] if r['val_bpc'] is not None else '-'}{'*' if r['diverged'] else ''}"
            for r in sweep) + f" -> SGD chain lr {args.sgd_lr:g}, irnn lr {args.irnn_lr:g}\n")
    if "rows" in report:
        print_table(report["rows"], rows, args)
    if "speed" in report:
        print_speed(report["speed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
