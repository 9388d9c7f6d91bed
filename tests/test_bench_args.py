"""The benchmark scripts refuse a user mistake at once: one ``error: ... (see 'SCRIPT --help')`` line on stderr and
exit code 2, before any measurement (no traceback, nothing from ../shared, no GPU)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def not_a_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-args") / "not-a-checkpoint.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 20, encoding="utf-8")
    return path


CASES = [
    ("bench_sample.py", ["--repeats", "0"]),
    ("bench_sample.py", ["--length", "0"]),
    ("bench_sample.py", ["--naive-length", "0"]),
    ("bench_sample.py", ["--checkpoint", "nosuch", "--text", "{file}"]),
    ("bench_sample.py", ["--checkpoint", "{file}", "--text", "{file}"]),
    ("bench_dropout.py", ["--steps", "0"]),
    ("bench_complete.py", ["--uncached", "0"]),
    ("bench_complete.py", ["--uncached", "-3"]),
    ("bench_complete.py", ["--clients", "0"]),
    ("bench_complete.py", ["--limit", "0"]),
    ("bench_complete.py", ["--limit", "1"]),
    ("bench_complete.py", ["--seconds", "-1"]),
    ("bench_complete.py", ["--checkpoint", "{file}", "--corpus", "{file}"]),
    ("bench_train.py", ["--budget", "0"]),
    ("bench_train.py", ["--budget", "-1"]),
    ("bench_train.py", ["--speed-budget", "0"]),
    ("bench_scale.py", ["--size-mb", "0"]),
    ("bench_scale.py", ["--steps", "0"]),
    ("tricks.py", ["--jobs", "0"]),
    ("tricks.py", ["--budget", "0"]),
    ("tricks.py", ["--threads", "0"]),
    ("tricks.py", ["--eval-every", "0"]),
    ("tricks.py", ["--speed-threads", "x"]),
    ("tricks.py", ["--sgd-lr-sweep", "1,,3"]),
    ("tricks.py", ["--corpus", "{file}", "--rows", "nosuch"]),
    ("bench_classify.py", ["--datasets", "nosuch"]),
    ("bench_classify.py", ["--budgets", "x"]),
    ("bench_classify.py", ["--budgets", "10,0"]),
    ("bench_classify.py", ["--hidden", "0"]),
]


@pytest.mark.parametrize(("script", "args"), CASES, ids=[f"{s}:{' '.join(a)}" for s, a in CASES])
def test_bad_argument_is_one_line_error(script, args, not_a_checkpoint):
    args = [a.replace("{file}", str(not_a_checkpoint)) for a in args]
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert lines[0].endswith(f"(see '{script} --help')"), lines[0]
    assert proc.stdout == ""


def test_classify_errors_name_the_choices():
    proc = subprocess.run([sys.executable, "benchmarks/bench_classify.py", "--datasets", "names,nosuch"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "names, sms" in proc.stderr and "'nosuch'" in proc.stderr, proc.stderr


def test_sample_text_default_is_beside_the_repository():
    spec = importlib.util.spec_from_file_location("bench_sample_args", REPO / "benchmarks" / "bench_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_TEXT == REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"


def test_scale_worker_failure_is_its_last_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_scale_args", REPO / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.run_worker("encode", str(tmp_path / "missing.txt"))
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the encode worker failed: "), lines
    assert "missing.txt" in lines[0]


def test_train_worker_failure_names_the_problem_without_a_traceback(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x y z\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--corpus", str(short), "--budget", "2", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.splitlines()[0], "error: the charnn worker failed (exit code 1; its "
                                        "message is above)"] and "the training text is too short" in proc.stderr
