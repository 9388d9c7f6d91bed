"""Fine-tuning vs linear probe on the development split, several classifier seeds, one language model.

Development-only: it uses bench_classify.py's data, splits and TF-IDF baseline with --split-seed 100 by
default, so that settings are chosen without looking at the test split of the benchmark of record.
One language model per dataset (trained once, reused from WORKDIR), then for each label budget the
TF-IDF + LR baseline and each variant with every seed. Prints one JSON line per fit and a summary.

    python benchmarks/classify_transfer_sweep.py --datasets sms,names --budgets 10,50,200 --variants tfidf,finetune,probe
    python benchmarks/classify_transfer_sweep.py --datasets sms --budgets all --variants tfidf,finetune,lr1e-3,lr6e-3

Variants: tfidf; finetune (gradual unfreezing, never a probe); probe (freeze_encoder=True);
auto (charnn's default choice); lrX (finetune at learning rate X).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from charnn.cli import OneLineArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
import bench_classify as bc


def variant_params(variant: str) -> dict:
    if variant == "finetune":
        return {"freeze_encoder": False}
    if variant == "probe":
        return {"freeze_encoder": True}
    if variant == "auto":
        return {}
    if variant.startswith("lr"):
        return {"freeze_encoder": False, "lr": float(variant[2:])}
    sys.exit(f"unknown variant {variant!r}")


def main(argv=None) -> None:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="sms,names")
    p.add_argument("--budgets", default="10,50,200", help="Per-class budgets; 'all' for every label.")
    p.add_argument("--variants", default="tfidf,finetune,probe")
    p.add_argument("--seeds", default="1234,1,2")
    p.add_argument("--split-seed", type=int, default=100)
    p.add_argument("--workdir", default="/tmp/charnn-classify-sweep", help="Language models are kept and reused here.")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    args = bc.parse_args(["--split-seed", str(a.split_seed)])
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.datasets.split(","):
        classes, (pool_x, pool_y), (test_x, test_y) = bc.test_split(name, args)
        workdir = Path(a.workdir) / f"{name}-split{a.split_seed}"
        lm = workdir / "lm"
        if not (lm / "best").exists():
            _, info = bc.train_lm(pool_x, args, workdir)
            print(json.dumps({"dataset": name, "language_model": info}), flush=True)
        for budget in [None if b == "all" else int(b) for b in a.budgets.split(",")]:
            (fit_x, fit_y), (val_x, val_y), _ = bc.labelled_sets(pool_x, pool_y, budget, args)
            for variant in a.variants.split(","):
                seeds = [0] if variant == "tfidf" else [int(s) for s in a.seeds.split(",")]
                for seed in seeds:
                    t0 = time.perf_counter()
                    if variant == "tfidf":
                        pred, _ = bc.tfidf_lr(fit_x, fit_y, val_x, val_y, test_x, classes)
                    else:
                        pred, _ = bc.charnn_fit(fit_x, fit_y.tolist(), val_x, val_y.tolist(), test_x, args, name=name,
                                                budget=budget, balance=name in args.balance.split(","),
                                                init_from=str(lm), seed=seed, **variant_params(variant))
                    row = {"dataset": name, "per_class": budget or "all", "variant": variant, "seed": seed,
                           "macro_f1": round(bc.macro_f1(test_y, pred, classes), 4),
                           "seconds": round(time.perf_counter() - t0, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['dataset']} {r['per_class']} {r['variant']}", []).append(r["macro_f1"])
    print(json.dumps({"split_seed": a.split_seed, "mean_macro_f1": {k: round(statistics.mean(v), 4)
                                                                   for k, v in summary.items()}}))


if __name__ == "__main__":
    main()
