"""Corpora larger than memory: streaming encode speed and peak memory while training.

1. Generates a text file of ``--size-mb`` (default 1024) by repeating an
   offline corpus (tiny Shakespeare from ../shared when present, else the
   interpreter's documentation).
2. Encodes it into the memory-mapped token file in a fresh process: MB/s and
   that process's peak resident memory.
3. Trains from it for ``--steps`` steps in another fresh process (reusing the
   cached token file): peak resident memory.

    python benchmarks/bench_scale.py                 # 1 GB
    python benchmarks/bench_scale.py --size-mb 64 --json
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

sys.path.insert(0, str(Path(__file__).parent))
from _args import at_least_one  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_corpus(path: Path, size_mb: int) -> None:
    if SHAKESPEARE.exists():
        seed = SHAKESPEARE.read_text(encoding="utf-8")
    else:
        from charnn.corpora import corpus_text

        seed = corpus_text("python-docs", progress=False)
    block = seed.encode("utf-8")
    target = size_mb * 1024 * 1024
    with open(path, "wb") as f:
        written = 0
        while written < target:
            piece = block[: target - written]
            f.write(piece)
            written += len(piece)


def encode_worker(corpus: str) -> dict:
    from charnn.data import load_corpus

    start = time.perf_counter()
    data = load_corpus([corpus], val_fraction=0.001, progress=False)
    seconds = time.perf_counter() - start
    size = Path(corpus).stat().st_size
    return {"seconds": seconds, "mb_per_s": size / 1e6 / seconds, "chars": data.n_chars, "dtype": data.train.dtype.name,
            "vocab": len(data.vocab), "token_file_mb": (data.n_chars * data.train.dtype.itemsize) / 1e6,
            "peak_rss_mb": peak_rss_mb()}


def train_worker(corpus: str, steps: int, out: str) -> dict:
    from charnn import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(corpus=[corpus], val_fraction=0.001, preset="small", max_steps=steps, out=out,
                                  quiet=True, eval_every=10**9))
    result = trainer.fit()
    return {"steps": result.steps, "chars_per_sec": result.train_chars_per_sec, "val_bpc": result.last_val_bpc,
            "memmap": type(trainer.corpus.train).__name__, "peak_rss_mb": peak_rss_mb()}


def run_worker(*args: str) -> dict:
    """Run a worker in its own process; when it fails, stop with its own last error line (not a traceback)."""
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if out.returncode != 0:
        lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"no message, exit code {out.returncode}"
        for prefix in ("error: ", "charnn.errors.CharnnError: "):  # a user-facing message needs no class name
            last = last[len(prefix):] if last.startswith(prefix) else last
        print(f"error: the {args[0]} worker failed: {last}", file=sys.stderr)
        sys.exit(out.returncode if out.returncode > 0 else 1)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=at_least_one, default=1024, help="size of the generated corpus in MiB")
    p.add_argument("--steps", type=at_least_one, default=200, help="training steps on it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        report = encode_worker(*rest) if kind == "encode" else train_worker(rest[0], int(rest[1]), rest[2])
        print(json.dumps(report))
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CHARNN_CACHE"] = str(Path(tmp) / "cache")
        corpus = Path(tmp) / "big.txt"
        make_corpus(corpus, args.size_mb)
        encode = run_worker("encode", str(corpus))
        training = run_worker("train", str(corpus), str(args.steps), str(Path(tmp) / "run"))
    result = {"size_mb": args.size_mb, "encode": encode, "train": training}
    if args.json:
        print(json.dumps(result))
        return
    print(f"corpus: {args.size_mb} MiB generated text, {encode['chars']:,} chars, vocabulary {encode['vocab']}")
    print(f"encode: {encode['seconds']:.1f} s = {encode['mb_per_s']:.0f} MB/s, {encode['dtype']} token file "
          f"{encode['token_file_mb']:.0f} MB, peak RSS {encode['peak_rss_mb']:.0f} MB")
    print(f"train:  {training['steps']} steps from the {training['memmap']}, {training['chars_per_sec']:,.0f} chars/s, "
          f"peak RSS {training['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
