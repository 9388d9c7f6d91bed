"""Training-step time with charnn's CPU dropout against PyTorch's, same model, same process.

charnn's masks come from NumPy's PCG64 (``charnn.model.dropout``), and the
stack runs layer by layer when it has dropout between layers
(``charnn.model.run_recurrent``). PyTorch's ``nn.Dropout`` and the fused
multi-layer ``nn.LSTM`` call draw their masks with ``bernoulli_``. Both
variants train the same model (the CPU default for a 10-minute budget:
``--preset medium``, 2x384 LSTM, dropout 0.2, batch 16 x 128, bf16 autocast,
Adam, clipping) for ``--steps`` steps each, interleaved step by step; each
variant's median step time counts (the machine's speed drifts).

    python benchmarks/bench_dropout.py [--json]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from charnn.cli import OneLineArgumentParser
import charnn.model as model_mod
from charnn.model import CharRNN, ModelConfig, sequence_loss
from charnn.presets import PRESETS

sys.path.insert(0, str(Path(__file__).parent))
from _args import at_least_one  # noqa: E402


def torch_dropout(x, p, training=True):
    return torch.nn.functional.dropout(x, p, training)


def make_step(dropout_fn, fused_stack: bool):
    """A training step of the default model with ``dropout_fn``; ``fused_stack``: one multi-layer call."""
    p = PRESETS["medium"]
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=65, layers=p["layers"], hidden=p["hidden"], embed_dim=64, dropout=p["dropout"]))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    x = torch.randint(0, 65, (p["batch_size"], p["seq_len"] + 1))
    state = [None]

    def step():
        model_mod.dropout = dropout_fn
        run = model_mod.run_recurrent
        if fused_stack:
            model_mod.run_recurrent = lambda rnn, inp, st=None, weight_drop=0.0: rnn(inp, st)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, new = model(x[:, :-1], state[0])
            loss = sequence_loss(logits, x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            state[0] = tuple(s.detach() for s in new)
        finally:
            model_mod.run_recurrent = run
    return step, p["batch_size"] * p["seq_len"]


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=at_least_one, default=100, help="steps per variant, interleaved; the median counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    charnn_dropout = model_mod.dropout
    variants = {"pytorch (bernoulli, fused stack)": make_step(torch_dropout, True),
                "charnn (PCG64 masks, layer by layer)": make_step(charnn_dropout, False)}
    times = {name: [] for name in variants}
    for step, _ in variants.values():
        for _ in range(3):
            step()  # warm-up
    for _ in range(args.steps):  # interleaved step by step, so drifts of the machine's speed hit both alike
        for name, (step, _) in variants.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    best = {name: float(np.median(t)) for name, t in times.items()}
    model_mod.dropout = charnn_dropout
    chars = next(iter(variants.values()))[1]
    names = list(variants)
    report = {"model": "2x384 LSTM, dropout 0.2, batch 16 x 128, bf16 autocast (the CPU default for --time 10m)",
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "steps": args.steps,
              "ms_per_step": {n: round(best[n] * 1e3, 2) for n in names},
              "chars_per_sec": {n: round(chars / best[n]) for n in names},
              "speedup": round(best[names[0]] / best[names[1]], 3)}
    if args.json:
        print(json.dumps(report))
        return
    for n in names:
        print(f"{n:<40}{report['ms_per_step'][n]:>9.2f} ms/step {report['chars_per_sec'][n]:>9,} chars/s")
    print(f"speed-up: {report['speedup']:.3f}x")


if __name__ == "__main__":
    main()
