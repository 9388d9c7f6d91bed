"""benchmarks/bench_classify.py's language-model budget: --lm-steps is a step count, never a silent fallback."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_classify.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_classify", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many"])
def test_lm_steps_below_one_is_refused_in_one_line(bench, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--lm-steps", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: argument --lm-steps: must be a whole number of 1 or more, "
                                                   f"got {value!r} (see '")


def test_lm_steps_trains_the_language_model_for_that_many_steps(bench, tmp_path):
    args = bench.parse_args(["--lm-steps", "3", "--lm-time", "0.001", "--hidden", "16", "--lm-layers", "1"])
    texts = [f"message number {i}, call 0800 {i:04d} now" for i in range(200)]
    _, info = bench.train_lm(texts, args, tmp_path)
    assert info["steps"] == 3 and info["stop"] == "max-steps"  # the tiny time budget was not used


def test_ensemble_language_models_get_their_own_seed_and_folder(bench, tmp_path):
    """--ensemble-lms: member i's language model is trained like the first, with seed --seed + i - 1, beside it."""
    args = bench.parse_args(["--lm-steps", "2", "--hidden", "16", "--lm-layers", "1", "--seed", "5",
                             "--ensemble-lms", "sms"])
    texts = [f"message number {i}, call 0800 {i:04d} now" for i in range(200)]
    first, _ = bench.train_lm(texts, args, tmp_path)
    second, _ = bench.train_lm(texts, args, tmp_path, seed=6)
    assert Path(first) == tmp_path / "lm" and Path(second) == tmp_path / "lm-seed-6"
    configs = [json.loads((Path(p) / "last" / "config.json").read_text())["training"] for p in (first, second)]
    assert [c["seed"] for c in configs] == [5, 6]
