"""Text classification benchmark: charnn (from scratch, fine-tuned from a language model) vs TF-IDF + logistic regression.

For each dataset (../shared/datasets/names.tsv: surnames in 20 languages;
../shared/datasets/sms_spam.tsv: SMS spam vs ham), in one invocation:

1. a fixed stratified train/test split (``--test-fraction`` of every class
   tests, seed ``--split-seed``);
2. a character language model trained with ``charnn.train`` on the training
   texts only, joined by newlines (no labels), for ``--lm-time`` seconds (or ``--lm-steps`` steps);
3. at every label budget (all labels, then ``--budgets`` examples per class,
   sampled from the training part; a class with fewer takes all it has), the
   labelled examples are split once more, stratified (``--val-fraction``,
   seed ``--split-seed`` + 1), into fitting and validation parts shared by all
   systems:

   * ``tfidf-lr``: TF-IDF over character 1-5-grams + scikit-learn's
     LogisticRegression; C (and balanced or plain class weights) chosen by
     validation macro-F1;
   * ``charnn-scratch``: ``TextClassifier`` from scratch, early stopping on
     validation macro-F1;
   * ``charnn-finetune``: the same, ``init_from`` the language model
     (discriminative learning rates, gradual unfreezing);
   * ``charnn-ensemble``: ``--ensemble`` fine-tuned classifiers (seeds
     ``--seed``, ``--seed`` + 1, ...) predicting with their mean probability
     (``TextClassifier(ensemble=N)``). Its first member is ``charnn-finetune``
     bit for bit, so with both systems that row is read from the ensemble's
     first member instead of being trained twice (its training time is then
     the member's own, without predicting the test texts). On the datasets
     named by ``--ensemble-lms``, member *i* fine-tunes from its own language
     model instead, trained as in step 2 with seed ``--seed`` + *i* - 1
     (``TextClassifier(init_from=[LM1, LM2, ...])``); the first is step 2's.

charnn's settings (a 1x256 LSTM from scratch, the language model's 2x256
when fine-tuned, concat pooling, at most 20 epochs with all labels and 40 at
the budgets, balanced class weights on names only, 3 ensemble members) were
chosen on a development split (``--split-seed 100``), never on the test split.
Test accuracy and macro-F1 come from ``charnn.classify.classification_report``
for every system (it matches scikit-learn's, see tests). Training time is the
wall clock of the fit including model selection; the language model's own
training time is reported separately.

    flock /tmp/charnn-bench.lock python benchmarks/bench_classify.py
    python benchmarks/bench_classify.py --datasets sms --budgets 50 --lm-time 30 --max-epochs 3   # a quick look
    python benchmarks/bench_classify.py --packing   # packed vs padded batches on this CPU
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from charnn.cli import OneLineArgumentParser
from charnn.classify import (TextClassifier, classification_report, encode_labels, encode_texts, predict_logits,
                             read_labelled, stratified_split)

sys.path.insert(0, str(Path(__file__).parent))
from _args import (at_least_one, comma_choices, comma_list, fraction, non_negative_int,  # noqa: E402
                   positive_float, probability)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATASETS = {"names": "datasets/names.tsv", "sms": "datasets/sms_spam.tsv"}
C_GRID = (0.1, 1.0, 10.0, 100.0)


def parse_args(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", type=comma_choices(DATASETS), default="names,sms", help="Comma-separated: names, sms.")
    p.add_argument("--budgets", type=comma_list(at_least_one, allow_empty=True), default="10,50,200", help="Labelled examples per class (besides all labels); '' for none.")
    p.add_argument("--test-fraction", type=fraction, default=0.2)
    p.add_argument("--val-fraction", type=fraction, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234, help="charnn's training seed.")
    p.add_argument("--hidden", type=at_least_one, default=256, help="Hidden units of each LM layer and of the scratch classifier (1 layer).")
    p.add_argument("--lm-time", type=positive_float, default=120, help="Seconds of language-model training per dataset.")
    p.add_argument("--lm-steps", type=at_least_one, default=None,
                   help="Train each language model for this many steps instead of --lm-time seconds, so the machine's "
                        "pace cannot change the model (2,350 steps is about 150 s on 2 idle cores).")
    p.add_argument("--lm-layers", type=at_least_one, default=2,
                   help="Recurrent layers of the language model, and so of the fine-tuned encoder (2: the SMS "
                        "targets at 10-200 per class, benchmarks/RESULTS.md, session 9).")
    p.add_argument("--lm-dropout", type=probability, default=0.0,
                   help="Dropout of the language model, between its layers and before its output layer; the "
                        "fine-tuned encoders inherit it between their layers.")
    p.add_argument("--max-epochs", type=positive_float, default=20, help="charnn epochs at most with all labels (early stopping on).")
    p.add_argument("--patience", type=at_least_one, default=4, help="charnn early-stopping patience (epochs) with all labels.")
    p.add_argument("--budget-max-epochs", type=positive_float, default=40, help="charnn epochs at most at the per-class budgets.")
    p.add_argument("--budget-patience", type=at_least_one, default=10, help="charnn patience at the per-class budgets.")
    p.add_argument("--max-chars", type=at_least_one, default=300, help="charnn truncates longer texts (keeping the head).")
    p.add_argument("--batch-size", type=at_least_one, default=32)
    p.add_argument("--random-crop", default="", metavar="DATASET:P,...",
                   help="charnn's --random-crop P on these datasets with all labels, e.g. sms:0.5 (the per-class budgets "
                        "keep their linear probe, which crops would turn off).")
    p.add_argument("--newline-frame", default="", metavar="DATASET,...",
                   help="charnn's --newline-frame on these datasets' fine-tuned classifiers with all labels, e.g. sms "
                        "(the language model's corpus holds one training text per line).")
    p.add_argument("--pool-every-layer", default="", metavar="DATASET,...",
                   help="charnn's --pool-layers all on these datasets' fine-tuned classifiers with all labels, e.g. sms.")
    p.add_argument("--ensemble-lms", default="", metavar="DATASET,...",
                   help="On these datasets each member of charnn-ensemble fine-tunes from its own language model "
                        "(trained like the first, with seeds SEED+1, SEED+2, ...), e.g. sms.")
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--balance", default="names", help="Datasets (comma-separated) on which charnn uses balanced class weights.")
    p.add_argument("--ensemble", type=at_least_one, default=3, help="Members of charnn-ensemble.")
    p.add_argument("--systems", default="tfidf-lr,charnn-scratch,charnn-finetune,charnn-ensemble")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default).")
    p.add_argument("--packing", action="store_true", help="Only time packed vs padded training batches, then exit.")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- data -----------------------------------------------------------------------------------------------
def load(name: str):
    path = SHARED / DATASETS[name]
    if not path.exists():
        sys.exit(f"{path} is absent: the shared data folder ships beside the repository")
    data = read_labelled(path)
    return data.texts, np.array(data.labels, dtype=object)


def per_class_sample(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """Up to ``n`` indices of every class (all of a smaller class); and the classes that had fewer."""
    rng = np.random.default_rng(seed)
    picked, short = [], {}
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            short[c] = int(len(idx))
        picked.extend(rng.permutation(idx)[:n].tolist())
    return np.array(sorted(picked)), short


# -- systems -----------------------------------------------------------------------------------------------
def tfidf_lr(fit_x, fit_y, val_x, val_y, test_x, classes):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 5), sublinear_tf=True, lowercase=False)
    xf, xv, xt = vec.fit_transform(fit_x), vec.transform(val_x), vec.transform(test_x)
    best = None
    for weights in (None, "balanced"):
        model = LogisticRegression(class_weight=weights, max_iter=1000, warm_start=True)  # each C starts from the last
        for c in C_GRID:
            model.set_params(C=c).fit(xf, fit_y)
            f1 = macro_f1(val_y, model.predict(xv), classes)
            if best is None or f1 > best[0]:
                best = (f1, c, weights, copy.deepcopy(model))
    f1, c, weights, model = best
    return model.predict(xt), {"C": c, "class_weight": weights or "none", "val_macro_f1": round(f1, 4),
                               "features": len(vec.vocabulary_)}


def crop_probability(args, dataset: str) -> float:
    """The --random-crop probability given for ``dataset`` (0: none)."""
    spec = dict(item.split(":", 1) for item in args.random_crop.split(",") if item)
    return float(spec.get(dataset, 0.0))


def all_label_options(args, dataset: str, fine_tuned: bool) -> dict:
    """The TextClassifier options that --random-crop, --newline-frame and --pool-every-layer give ``dataset`` with all
    labels (the last two for fine-tuned classifiers only)."""
    frame = fine_tuned and dataset in args.newline_frame.split(",")
    every_layer = fine_tuned and dataset in args.pool_every_layer.split(",")
    return {"random_crop": crop_probability(args, dataset), "newline_frame": frame,
            "pool_layers": "all" if every_layer else "top"}


def charnn_fit(fit_x, fit_y, val_x, val_y, test_x, args, *, name, budget, balance, init_from=None, **overrides):
    """charnn's classifier with the benchmark's settings (``overrides``: other TextClassifier parameters)."""
    epochs, patience = (args.max_epochs, args.patience) if budget is None else (args.budget_max_epochs, args.budget_patience)
    encoder = {} if init_from else dict(hidden=args.hidden, layers=1, embed_dim=64)  # fine-tuning: the LM's own
    params = dict(**encoder, max_epochs=epochs, patience=patience,
                  max_chars=args.max_chars, batch_size=args.batch_size, lr=args.lr, balance=balance,
                  **(all_label_options(args, name, init_from is not None) if budget is None else {}),
                  init_from=init_from, seed=args.seed, device="cpu", quiet=True)
    clf = TextClassifier(**{**params, **overrides})
    clf.fit(fit_x, fit_y, val_texts=val_x, val_labels=val_y)
    r = clf.result_
    probe = bool(clf.checkpoint_config_["training"]["freeze_encoder"])  # charnn's choice: a probe on small sets
    info = {"epochs": round(r.epochs, 2), "val_macro_f1": r.best_val_f1, "stop": r.stop_reason,
            **({"linear_probe": True} if probe else {})}
    if r.members:
        info["members"] = [{k: m[k] for k in ("seed", "epochs", "best_val_f1", "elapsed")} for m in r.members]
        info["first_member_pred"] = first_member_predictions(clf, test_x)
    return clf.predict(test_x), info


def first_member_predictions(clf: TextClassifier, texts: list[str]) -> np.ndarray:
    """What an ensemble's first member alone predicts."""
    meta = clf.checkpoint_config_["classifier"]
    encoded = encode_texts(texts, clf.vocab_, meta["max_chars"], meta["truncation"])
    return clf.classes_[predict_logits(clf.net_.members[0], encoded).argmax(1)]


def macro_f1(y_true, y_pred, classes) -> float:
    return scores(y_true, y_pred, classes)["macro_f1"]


def scores(y_true, y_pred, classes) -> dict:
    _, t = encode_labels(list(y_true), False, classes)
    _, p = encode_labels(list(y_pred), False, classes)
    rep = classification_report(t, p, classes)
    return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"]}


def train_lm(texts: list[str], args, workdir: Path, seed: int | None = None) -> tuple[str, dict]:
    """A language model on ``texts`` (seed ``args.seed`` unless given) in ``workdir``."""
    from charnn import TrainConfig, train

    seed = args.seed if seed is None else seed
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "lm-corpus.txt"
    order = np.random.default_rng(args.split_seed + 3).permutation(len(texts))  # the files are sorted by label
    corpus.write_text("\n".join(texts[i] for i in order) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    result = train(TrainConfig(corpus=[str(corpus)], cell="lstm", layers=args.lm_layers, hidden=args.hidden, embed_dim=64,
                               batch_size=32, seq_len=64, lr=2e-3, warmup_steps=50, dropout=args.lm_dropout,
                               time_budget=None if args.lm_steps else args.lm_time, max_steps=args.lm_steps,
                               val_fraction=0.05, patience=4, eval_every=100, seed=seed, device="cpu",
                               out=str(workdir / ("lm" if seed == args.seed else f"lm-seed-{seed}")), quiet=True))
    return str(result.run_dir), {"seconds": round(time.perf_counter() - t0, 1), "chars": len(corpus.read_text()),
                                 "best_val_bpc": result.best_val_bpc, "steps": result.steps,
                                 "epochs": round(result.epochs, 2), "stop": result.stop_reason}


# -- one dataset -------------------------------------------------------------------------------------------
def test_split(name: str, args):
    """The dataset's classes, its training pool (texts, labels) and its test part, split by ``--split-seed``."""
    texts, labels = load(name)
    classes = np.array(sorted(set(labels.tolist())))
    train_idx, test_idx = stratified_split(labels.tolist(), args.test_fraction, args.split_seed)
    return (classes, ([texts[i] for i in train_idx], labels[train_idx]),
            ([texts[i] for i in test_idx], labels[test_idx]))


def labelled_sets(pool_x, pool_y, budget: int | None, args):
    """The labelled examples at a budget (None: the whole pool) as fitting and validation parts, and the
    classes that have fewer than the budget."""
    if budget is None:
        sel, short = np.arange(len(pool_x)), {}
    else:
        sel, short = per_class_sample(pool_y, budget, args.split_seed + 2)
    lab_x, lab_y = [pool_x[i] for i in sel], pool_y[sel]
    fit_i, val_i = stratified_split(lab_y.tolist(), args.val_fraction, args.split_seed + 1)
    return ([lab_x[i] for i in fit_i], lab_y[fit_i]), ([lab_x[i] for i in val_i], lab_y[val_i]), short


def run_dataset(name: str, args, workdir: Path) -> dict:
    classes, (pool_x, pool_y), (test_x, test_y) = test_split(name, args)
    log(f"[{name}] {len(pool_x) + len(test_x):,} texts, {len(classes)} classes: {len(pool_x):,} train / "
        f"{len(test_x):,} test")
    systems = args.systems.split(",")
    lm_path, lm_info = None, None
    if {"charnn-finetune", "charnn-ensemble"} & set(systems):
        lm_budget = f"{args.lm_steps:,} steps" if args.lm_steps else f"{args.lm_time:g} s"
        log(f"[{name}] language model on the {len(pool_x):,} training texts ({lm_budget})")
        lm_path, lm_info = train_lm(pool_x, args, workdir / name)
        log(f"[{name}] language model: {lm_info}")
    ensemble_lms, ensemble_lm_infos = lm_path, []
    if "charnn-ensemble" in systems and name in args.ensemble_lms.split(",") and args.ensemble > 1:
        ensemble_lms = [lm_path]
        for seed in range(args.seed + 1, args.seed + args.ensemble):
            path, info = train_lm(pool_x, args, workdir / name, seed=seed)
            log(f"[{name}] language model (seed {seed}) for ensemble member {len(ensemble_lms) + 1}: {info}")
            ensemble_lms.append(path)
            ensemble_lm_infos.append({"seed": seed, **info})
    budgets = [None] + [int(b) for b in args.budgets.split(",") if b.strip()]
    rows = []
    for budget in budgets:
        (fit_x, fit_y), (val_x, val_y), short = labelled_sets(pool_x, pool_y, budget, args)
        def add_row(system, pred, seconds, extra):
            row = {"dataset": name, "per_class": budget or "all", "system": system, "labelled": len(fit_x) + len(val_x),
                   "fit": len(fit_x), "val": len(val_x), **scores(test_y, pred, classes), "train_seconds": round(seconds, 1),
                   **extra}
            if short:
                row["classes_short"] = short
            rows.append(row)
            log(f"[{name}] {str(budget or 'all'):>4}/class {system:<16} acc {row['accuracy']:.4f}  "
                f"macro-F1 {row['macro_f1']:.4f}  {seconds:6.1f} s  {extra}")

        for system in systems:
            if system == "charnn-finetune" and "charnn-ensemble" in systems:
                continue  # the ensemble's first member (below)
            t0 = time.perf_counter()
            if system == "tfidf-lr":
                pred, extra = tfidf_lr(fit_x, fit_y, val_x, val_y, test_x, classes)
            elif system in ("charnn-scratch", "charnn-finetune", "charnn-ensemble"):
                pred, extra = charnn_fit(fit_x, fit_y.tolist(), val_x, val_y.tolist(), test_x, args, name=name, budget=budget,
                                         balance=name in args.balance.split(","),
                                         init_from={"charnn-scratch": None, "charnn-ensemble": ensemble_lms}.get(system, lm_path),
                                         ensemble=args.ensemble if system == "charnn-ensemble" else 1)
            else:
                sys.exit(f"unknown system {system!r}")
            seconds = time.perf_counter() - t0
            if system == "charnn-ensemble" and "charnn-finetune" in systems:
                first = extra["members"][0]
                add_row("charnn-finetune", extra.pop("first_member_pred"), first["elapsed"],
                        {"epochs": first["epochs"], "val_macro_f1": first["best_val_f1"], "first_member_of_ensemble": True,
                         **({"linear_probe": True} if extra.get("linear_probe") else {})})
            extra.pop("first_member_pred", None)
            add_row(system, pred, seconds, extra)
    return {"dataset": name, "texts": len(pool_x) + len(test_x), "classes": len(classes), "train": len(pool_x), "test": len(test_x),
            "language_model": lm_info, **({"ensemble_language_models": ensemble_lm_infos} if ensemble_lm_infos else {}),
            "rows": rows}


def verdicts(results: list[dict]) -> dict:
    """The issue's targets: best charnn beats TF-IDF macro-F1 with all labels; fine-tuned >= TF-IDF at 50/class."""
    out = {}
    for res in results:
        by = {(r["per_class"], r["system"]): r["macro_f1"] for r in res["rows"]}
        base = by.get(("all", "tfidf-lr"))
        best = max([by[k] for k in (("all", "charnn-scratch"), ("all", "charnn-finetune"), ("all", "charnn-ensemble"))
                    if k in by], default=None)
        if base is not None and best is not None:
            out[f"{res['dataset']}: best charnn > tfidf (all labels)"] = best > base
        tuned = [by[k] for k in ((50, "charnn-finetune"), (50, "charnn-ensemble")) if k in by]
        if (50, "tfidf-lr") in by and tuned:
            out[f"{res['dataset']}: finetune >= tfidf (50/class)"] = max(tuned) >= by[(50, "tfidf-lr")]
    return out


# -- packed vs padded ---------------------------------------------------------------------------------------
def time_packing(args) -> dict:
    """Seconds per training batch with packed sequences and with padded batches (fused kernel), same buckets."""
    from charnn.classify import ClassifierNet, collate, length_batches
    from charnn.model import ModelConfig

    out = {}
    for name in args.datasets.split(","):
        texts, labels = load(name)
        lengths = np.array([min(len(t), args.max_chars) for t in texts])
        rng = np.random.default_rng(0)
        batches = length_batches(lengths, args.batch_size, rng)[:40]
        encoded = [np.minimum(np.frombuffer(t[:args.max_chars].encode("utf-32-le"), np.uint32), 99).astype(np.int64) + 1
                   for t in texts]
        torch.manual_seed(0)
        net = ClassifierNet(ModelConfig(vocab_size=101, layers=1, hidden=args.hidden, embed_dim=64), 20)
        res = {}
        for mode in ("packed", "padded"):
            net.packing = mode
            t0 = time.perf_counter()
            for idx in batches:
                ids, lens = collate(encoded, idx)
                net(ids, lens).logsumexp(1).mean().backward()
            res[mode] = (time.perf_counter() - t0) / len(batches)
        res["padded_speedup"] = res["packed"] / res["padded"]
        out[name] = {k: round(v, 4) for k, v in res.items()}
        log(f"[{name}] seconds per batch of {args.batch_size}: packed {res['packed']:.4f}, padded {res['padded']:.4f} "
            f"(padded {res['padded_speedup']:.2f}x faster)")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    if args.packing:
        report = {"packing": time_packing(args), "settings": vars(args), "environment": env}
        print(json.dumps(report) if args.json else json.dumps(report["packing"], indent=1))
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="charnn-bench-classify-") as tmp:
        results = [run_dataset(name, args, Path(tmp)) for name in args.datasets.split(",")]
    report = {"results": results, "targets": verdicts(results), "settings": vars(args), "environment": env,
              "total_seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{'dataset':<7} {'labels/class':>12} {'system':<16} {'fit+val':>8} {'accuracy':>9} {'macro-F1':>9} {'train s':>8}")
    for res in results:
        for r in res["rows"]:
            print(f"{r['dataset']:<7} {str(r['per_class']):>12} {r['system']:<16} {r['labelled']:>8} "
                  f"{r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['train_seconds']:>8.1f}")
        if res["language_model"]:
            lm = res["language_model"]
            print(f"{res['dataset']}: language model {lm['seconds']:.0f} s, {lm['steps']} steps, {lm['epochs']} epochs, "
                  f"val bpc {lm['best_val_bpc']:.3f}")
    for k, v in report["targets"].items():
        print(f"target {k}: {'met' if v else 'NOT met'}")
    print(f"total {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
