"""Autocomplete benchmark: keystroke latency, keystroke savings against a dictionary, and a server load test.

Usage (wrap in the benchmark lock; the whole run takes several minutes)::

    python benchmarks/bench_complete.py [--checkpoint RUN_DIR] [--json]

Without ``--checkpoint`` it uses ``checkpoints/bench-complete-small``, and
first trains it there when it is missing: ``charnn train CORPUS --preset small
--time 10m`` (the default 2x256 CPU model, first 90% of the corpus), so the
benchmark needs nothing but the corpus.

1. Typing: a simulated user types the held-out last ``val_fraction`` of the
   corpus (the part the model never trained on), with incremental state;
   every keystroke asks for k=3 word completions. Reports the latency per
   keystroke (p50/p95/p99), the keystroke savings of the top-1 and top-3
   users for the model and for a dictionary baseline built from the training
   part (the most frequent words with the typed prefix), and next-character
   accuracy. The same keystrokes are then timed without the state cache
   (every call re-reads its context window): the baseline for the
   incremental-state speedup.
2. Server: ``charnn serve`` in a subprocess on 127.0.0.1; 16 client threads
   each type their own passage against ``POST /v1/complete`` for 30 s.
   Reports requests/s, latency p50/p99 and errors.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from charnn.cli import OneLineArgumentParser
from charnn.errors import CharnnError

sys.path.insert(0, str(Path(__file__).parent))
from _args import at_least, at_least_one, non_negative_float  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "bench-complete-small"
DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"


def split_corpus(corpus: Path, checkpoint) -> tuple[str, str]:
    """(training part, held-out part) of the corpus, cut where the checkpoint's training cut it."""
    from charnn.data import read_corpus_text, split_point

    text = read_corpus_text([corpus])
    val_fraction = float((checkpoint.config.get("training") or {}).get("val_fraction", 0.1))
    cut = split_point(len(text), val_fraction)
    return text[:cut], text[cut:]


def uncached_latency(completer, doc: str, n: int) -> np.ndarray:
    """Latency of k=3 word completions when every call re-reads its whole context window.

    Timed deep in the passage (past two windows), where a window is as long as it gets.
    """
    first = min(2 * completer.context_chars, max(1, len(doc) - n))
    out = np.zeros(n)
    for i, pos in enumerate(range(first, first + n)):
        text = doc[completer.context_start(pos):pos]
        completer.clear_cache()
        t0 = time.perf_counter()
        completer.suggest(text, k=3, mode="word")
        out[i] = time.perf_counter() - t0
    return out


# -- server load test ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int) -> subprocess.Popen:
    script = Path(sys.executable).with_name("charnn")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "charnn.cli"]
    proc = subprocess.Popen(cmd + ["serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not answer /healthz within 120 s")


def load_test(port: int, passage: str, clients: int, seconds: float) -> dict:
    """``clients`` threads typing their own slices of ``passage`` against /v1/complete for ``seconds``."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/complete"
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    start_barrier = threading.Barrier(clients)
    span = 1500  # characters typed per document before a client starts a new one

    def client(i: int, deadline_box: list) -> None:
        with httpx.Client(timeout=10.0) as http:
            start_barrier.wait()
            deadline = deadline_box[0]
            offset = (i * 7919) % max(1, len(passage) - span)
            typed = 1
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = http.post(url, json={"text": passage[offset:offset + typed], "k": 3, "mode": "word"})
                    if r.status_code != 200:
                        errors[i].append(f"HTTP {r.status_code}: {r.text[:200]}")
                    else:
                        r.json()["suggestions"]
                except Exception as e:  # noqa: BLE001 (every failure counts as an error)
                    errors[i].append(repr(e))
                latencies[i].append(time.perf_counter() - t0)
                typed += 1
                if typed > span:
                    offset, typed = (offset + span) % max(1, len(passage) - span), 1

    deadline_box = [time.perf_counter() + seconds + 0.5]
    threads = [threading.Thread(target=client, args=(i, deadline_box)) for i in range(clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.perf_counter() - t_start
    lat = np.array([x for per in latencies for x in per]) * 1e3
    errs = [e for per in errors for e in per]
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": int(len(lat)),
            "requests_per_s": len(lat) / elapsed, "errors": len(errs), "error_samples": errs[:5],
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                           "p99": float(np.percentile(lat, 99)), "max": float(lat.max())}}


# -- main ---------------------------------------------------------------------------------------------------
def setup(args) -> tuple:
    """Load the checkpoint and the corpus, and cut the passage to type: (model, checkpoint, training text, passage).
    Quick; a user mistake here raises CharnnError before any measurement."""
    from charnn import checkpoint as ckpt
    from charnn.lm import load_language_model

    ck = ckpt.load_checkpoint(args.checkpoint)
    train_text, held_out = split_corpus(Path(args.corpus), ck)
    passage = held_out[:args.limit] if args.limit else held_out
    if len(passage) < 2:
        raise CharnnError(f"the held-out part of {args.corpus} holds {len(passage)} character(s) to type; "
                          "the benchmark needs at least 2 (a longer corpus)")
    model, ck = load_language_model(args.checkpoint)
    return model, ck, train_text, passage


def run(args, model, ck, train_text: str, passage: str) -> dict:
    import torch

    from charnn.completion import Completer
    from charnn.completion_eval import DictionaryCompleter, evaluate_completion

    completer = Completer(model, vocab=ck.vocab)
    report: dict = {"checkpoint": str(ck.path), "corpus": str(args.corpus), "torch_threads": torch.get_num_threads(),
                    "model": {k: ck.config["model"][k] for k in ("cell", "layers", "hidden", "embed_dim")},
                    "train_chars": len(train_text), "typed_chars": len(passage),
                    "model_training": {k: ck.config["summary"].get(k) for k in ("step", "epoch", "best_val_bpc", "elapsed")}}
    dictionary = DictionaryCompleter(train_text)
    typing = evaluate_completion(completer, passage, k=3, mode="word", dictionary=dictionary, progress=not args.quiet)
    report["typing"] = typing
    n = min(args.uncached, len(passage) - 1)
    cached_ms = typing["latency_ms"]
    uncached = uncached_latency(Completer(model, vocab=ck.vocab), passage, n) * 1e3
    report["uncached"] = {"keystrokes": n, "p50": float(np.percentile(uncached, 50)),
                          "p99": float(np.percentile(uncached, 99)), "mean": float(uncached.mean())}
    report["incremental_speedup_p50"] = report["uncached"]["p50"] / cached_ms["p50"]
    if args.seconds > 0:
        port = free_port()
        server = start_server(Path(args.checkpoint), port)
        try:
            report["server"] = load_test(port, passage, args.clients, args.seconds)
            import httpx

            report["server"]["alive_after"] = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
    report["targets"] = {
        "latency_p99_le_10ms": cached_ms["p99"] <= 10.0,
        "latency_p50_le_3ms": cached_ms["p50"] <= 3.0,
        "savings_top3_gain_ge_5_points": typing["savings_top3_gain_points"] >= 5.0,
        **({"server_zero_errors": report["server"]["errors"] == 0} if "server" in report else {}),
    }
    return report


def print_table(r: dict) -> None:
    t, lat = r["typing"], r["typing"]["latency_ms"]
    m = r["model"]
    print(f"model {m['layers']}x{m['hidden']} {m['cell'].upper()} ({r['checkpoint']}), torch threads {r['torch_threads']}")
    mt = r["model_training"]
    print(f"trained {mt['elapsed']} s, {mt['step']} steps, {mt['epoch']} epochs, best validation {mt['best_val_bpc']:.4f} bpc")
    print(f"typed {r['typed_chars']:,} held-out characters; dictionary of {t['dictionary']['words']:,} training words")
    print()
    print(f"{'':28} {'savings top-1':>14} {'savings top-3':>14}")
    for name, s in (("charnn Completer (k=3)", t["model"]), ("dictionary baseline", t["dictionary"])):
        print(f"{name:28} {s['savings_top1']:13.2f}% {s['savings_top3']:13.2f}%")
    print(f"{'gain (points)':28} {t['savings_top1_gain_points']:+13.2f}  {t['savings_top3_gain_points']:+13.2f}")
    print(f"next character: top-1 {t['next_char_top1']:.2f}%, top-5 {t['next_char_top5']:.2f}%")
    print()
    u = r["uncached"]
    print(f"latency per keystroke (incremental state): p50 {lat['p50']:.2f} ms  p95 {lat['p95']:.2f} ms  "
          f"p99 {lat['p99']:.2f} ms  max {lat['max']:.2f} ms")
    print(f"without the state cache ({u['keystrokes']} keystrokes): p50 {u['p50']:.2f} ms  p99 {u['p99']:.2f} ms  "
          f"-> incremental is {r['incremental_speedup_p50']:.1f}x faster at p50")
    if "server" in r:
        s = r["server"]
        print()
        print(f"server: {s['clients']} clients for {s['seconds']} s: {s['requests']:,} requests, "
              f"{s['requests_per_s']:.1f} req/s, p50 {s['latency_ms']['p50']:.1f} ms, p99 {s['latency_ms']['p99']:.1f} ms, "
              f"{s['errors']} errors")
    print()
    print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["targets"].items()))


def train_default_model(args) -> None:
    """Train the default 2x256 CPU model (``--preset small``) on the corpus into the default checkpoint."""
    cmd = [sys.executable, "-m", "charnn", "train", args.corpus, "--preset", "small", "--time", args.train_time,
           "--out", str(DEFAULT_CHECKPOINT)] + (["--quiet"] if args.quiet or args.json else [])
    print("training the benchmark model: " + " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="Run directory of the 2x256 model (default: trained first if missing).")
    p.add_argument("--train-time", default="10m", help="Training budget when the default checkpoint is missing.")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="The model's training corpus (tiny Shakespeare).")
    p.add_argument("--limit", type=at_least(2), help="Type only the first N (2 or more) held-out characters.")
    p.add_argument("--uncached", type=at_least_one, default=300, help="Keystrokes timed without the state cache.")
    p.add_argument("--clients", type=at_least_one, default=16, help="Client threads of the server load test.")
    p.add_argument("--seconds", type=non_negative_float, default=30.0, help="Server load test duration; 0 skips it.")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = p.parse_args(argv)
    if not Path(args.corpus).is_file():
        p.error(f"{args.corpus} not found; pass --corpus PATH to tiny Shakespeare")
    if not Path(args.checkpoint).exists():
        if Path(args.checkpoint) != DEFAULT_CHECKPOINT:
            p.error(f"{args.checkpoint} not found; pass a run directory of a trained model")
        train_default_model(args)
    try:
        loaded = setup(args)
    except CharnnError as e:
        p.error(str(e))
    report = run(args, *loaded)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
