"""Tests for charnn.inference (the stepper), charnn.sampling, charnn.lm.LanguageModel and `charnn sample`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from charnn.errors import CharnnError
from charnn.inference import Stepper, StepState
from charnn.model import CharRNN, ModelConfig

V = 23

STEPPER_CASES = {
    "lstm": dict(cell="lstm"),
    "gru": dict(cell="gru"),
    "rnn-tanh": dict(cell="rnn"),
    "rnn-relu": dict(cell="rnn", activation="relu", init="identity"),
    "lstm-onehot": dict(cell="lstm", embed_dim=0),
    "gru-3-layers-onehot": dict(cell="gru", layers=3, embed_dim=0),
    "rnn-1-layer": dict(cell="rnn", layers=1),
    "lstm-tied-projection": dict(cell="lstm", tie_weights=True, embed_dim=12),
    "gru-tied-no-projection": dict(cell="gru", tie_weights=True, embed_dim=24, hidden=24),
    "lstm-dropout": dict(cell="lstm", dropout=0.4, embed_dropout=0.2),
    "lstm-gate-slope": dict(cell="lstm", gate_slope=2.5),
    "gru-layer-norm": dict(cell="gru", layer_norm=True),
    "rnn-layer-norm": dict(cell="rnn", layer_norm=True),
}


def make_model(seed: int = 0, **overrides) -> CharRNN:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, **{**dict(layers=2, hidden=24, embed_dim=8), **overrides})
    model = CharRNN(cfg)
    with torch.no_grad():  # non-zero biases everywhere, so folding them is tested
        for name, p in model.named_parameters():
            if "bias" in name or "shift" in name:
                p.normal_(0, 0.3)
    return model.eval()


# -- the stepper ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(STEPPER_CASES))
def test_step_matches_model_forward(case, backend):
    """prime + step logits equal the model's own forward pass over the same text, for every cell."""
    model = make_model(**STEPPER_CASES[case])
    stepper = Stepper(model, backend=backend)
    assert stepper.backend == ("model" if model.config.uses_custom_cell else backend)
    ids = torch.randint(0, V, (3, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_state = model(ids)
    logits, state = stepper.prime(ids[:, :5])
    assert logits.dtype == torch.float32 and logits.shape == (3, V)
    torch.testing.assert_close(logits, ref[:, 4], rtol=1e-4, atol=1e-5)
    for t in range(5, 14):
        logits, state = stepper.step(ids[:, t], state)
        torch.testing.assert_close(logits, ref[:, t], rtol=1e-4, atol=1e-5)
    # the state converts back to the model's format and continues identically
    model_state = stepper.to_model_state(state)
    for a, b in zip(model_state if isinstance(model_state, tuple) else [model_state],
                    ref_state if isinstance(ref_state, tuple) else [ref_state]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["lstm", "gru", "rnn-relu", "lstm-onehot"])
def test_long_prime_crosses_blocks(case):
    """A text longer than PRIME_BLOCK is read in blocks, carrying the state: same as one model pass."""
    from charnn.inference import PRIME_BLOCK

    model = make_model(**STEPPER_CASES[case])
    ids = torch.randint(0, V, (2, 2 * PRIME_BLOCK + 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, ref_state = model(ids)
    logits, state = Stepper(model).prime(ids)
    tol = dict(rtol=1e-3, atol=1e-4)  # 500+ steps of float32 rounding (the ReLU net's values reach the hundreds)
    torch.testing.assert_close(logits, ref[:, -1], **tol)
    got = Stepper(model).to_model_state(state)
    for a, b in zip(got if isinstance(got, tuple) else [got], ref_state if isinstance(ref_state, tuple) else [ref_state]):
        torch.testing.assert_close(a, b, **tol)


def test_step_from_initial_state_and_prime_with_state():
    model = make_model()
    stepper = Stepper(model)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = model(ids)
    logits, state = stepper.step(ids[:, 0], stepper.initial_state(2))
    torch.testing.assert_close(logits, ref[:, 0], rtol=1e-4, atol=1e-5)
    logits, state = stepper.prime(ids[:, 1:6], state)  # prime continues from a stepped state
    torch.testing.assert_close(logits, ref[:, 5], rtol=1e-4, atol=1e-5)
    logits, _ = stepper.step(ids[:, 6], state)
    torch.testing.assert_close(logits, ref[:, 6], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["lstm", "gru", "lstm-gate-slope"])
def test_step_leaves_its_input_state_unchanged(case):
    """Old states stay valid (caches and beam search keep them)."""
    stepper = Stepper(make_model(**STEPPER_CASES[case]))
    _, state = stepper.prime(torch.tensor([[1, 2, 3]]))
    first, _ = stepper.step(torch.tensor([4]), state)
    stepper.step(torch.tensor([5]), state)
    again, _ = stepper.step(torch.tensor([4]), state)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["lstm", "gru", "rnn-tanh", "lstm-gate-slope"])
def test_select_restricts_reorders_and_repeats_rows(case):
    model = make_model(**STEPPER_CASES[case])
    stepper = Stepper(model)
    ids = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(3))
    _, state = stepper.prime(ids)
    rows = torch.tensor([2, 0, 0, 1])
    picked = stepper.select(state, rows)
    assert stepper.batch_size(picked) == 4
    nxt = torch.tensor([7, 8, 9, 10])
    got, _ = stepper.step(nxt, picked)
    with torch.no_grad():
        ref, _ = model(torch.cat([ids[rows], nxt[:, None]], 1))
    torch.testing.assert_close(got, ref[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["lstm", "gru", "rnn-tanh"])
def test_large_batches_step_in_parts_whatever_the_thread_count(case):
    """Large batches split each layer by hidden units over threads: same numbers on 1 or 2 threads."""
    from charnn.inference import PART_ROWS

    model = make_model(**STEPPER_CASES[case])
    stepper = Stepper(model)
    B = 2 * PART_ROWS + 5
    assert stepper._parts_for(B) == 2
    ids = torch.randint(0, V, (B, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = model(ids)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, state = stepper.prime(ids[:, :2])
            out = []
            for t in range(2, 6):
                logits, state = stepper.step(ids[:, t], state)
                out.append(logits)
                torch.testing.assert_close(logits, ref[:, t], rtol=1e-4, atol=1e-5)
            runs.append(torch.stack(out))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])


def test_batch_one_and_numpy_ids():
    """Ids may be a list or a NumPy array; the numpy backend's step_arrays returns NumPy logits."""
    model = make_model()
    stepper = Stepper(model)
    _, state = stepper.prime(torch.tensor([[3]]))
    logits, state2 = stepper.step_arrays(np.array([4]), state)
    assert isinstance(logits, np.ndarray) and logits.shape == (1, V)
    assert isinstance(state2, StepState) and state2.batch == 1
    torch_logits, _ = stepper.step([4], state)
    np.testing.assert_array_equal(logits, torch_logits.numpy())


def test_stepper_is_a_snapshot_and_rejects_bad_input():
    model = make_model()
    stepper = Stepper(model)
    before, _ = stepper.prime(torch.tensor([[1, 2]]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    after, _ = stepper.prime(torch.tensor([[1, 2]]))
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert model.training is False and stepper.vocab_size == V
    with pytest.raises(CharnnError, match="shape"):
        stepper.prime(torch.tensor([1, 2]))
    with pytest.raises(CharnnError, match="rows of ids"):
        stepper.prime(torch.tensor([[1, 2]]), stepper.initial_state(2))
    with pytest.raises(CharnnError, match="one id per state row"):
        stepper.step(torch.tensor([1, 2]), stepper.initial_state(3))
    with pytest.raises(CharnnError, match="CharRNN"):
        Stepper(torch.nn.Linear(2, 2))


def test_stepper_shared_by_threads():
    """Scratch buffers are per thread: concurrent steps give the single-threaded answers."""
    model = make_model()
    stepper = Stepper(model)
    ids = torch.randint(0, V, (4, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, _ = model(ids)
    results, errors = {}, []

    def run(row):
        try:
            state = stepper.initial_state(1)
            out = []
            for t in range(ids.shape[1]):
                logits, state = stepper.step(ids[row:row + 1, t], state)
                out.append(logits)
            results[row] = torch.cat(out)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for row in range(4):
        torch.testing.assert_close(results[row], ref[row], rtol=1e-4, atol=1e-5)


# -- choosing characters -----------------------------------------------------------------------------------
def test_chooser_filters():
    from charnn.sampling import Chooser, SamplingOptions

    logits = np.log(np.array([[0.05, 0.4, 0.3, 0.15, 0.1]], dtype=np.float32))
    def dist(**kw):
        p = Chooser(SamplingOptions(allow_unknown=True, **kw), 5).distribution(logits.copy())[0]
        return p / p.sum()
    np.testing.assert_allclose(dist(), [0.05, 0.4, 0.3, 0.15, 0.1], rtol=1e-6)
    assert np.count_nonzero(dist(top_k=2)) == 2 and dist(top_k=2)[[1, 2]].sum() == pytest.approx(1)
    np.testing.assert_allclose(dist(top_p=0.7), [0, 0.4 / 0.7, 0.3 / 0.7, 0, 0], rtol=1e-6)  # 0.4 + 0.3 reaches 0.7
    np.testing.assert_allclose(dist(top_p=0.71), [0, 0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0], rtol=1e-6)
    assert np.count_nonzero(dist(top_p=1e-9)) == 1
    hot, cold = dist(temperature=2.0), dist(temperature=0.5)
    assert hot.max() < 0.4 < cold.max()
    # the unknown symbol (id 0) is never drawn unless allowed
    assert Chooser(SamplingOptions(), 5).distribution(logits.copy())[0, 0] == 0


def test_chooser_draws_follow_the_distribution():
    from charnn.sampling import Chooser, SamplingOptions

    probs = np.array([0.0, 0.5, 0.3, 0.2])
    logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)[None].repeat(20000, 0)
    u = np.random.default_rng(0).random(20000)
    chooser = Chooser(SamplingOptions(), 4)
    ids = chooser.choose(logits.copy(), u)
    freq = np.bincount(ids, minlength=4) / len(ids)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    # batch 1 takes the same decisions as a batch
    assert [chooser.choose(logits[:1].copy(), u[i:i + 1])[0] for i in range(300)] == list(ids[:300])
    one = lambda x: chooser.choose(logits[:1].copy(), np.array([x]))[0]  # noqa: E731
    assert one(0.0) == 1 and one(0.51) == 2 and one(np.nextafter(1, 0)) == 3
    assert list(chooser.choose(logits[:3].copy(), np.array([0.49, 0.81, 0.79]))) == [1, 3, 2]
    with pytest.raises(CharnnError, match="invalid scores"):
        chooser.choose(np.full((1, 4), np.nan, dtype=np.float32), np.array([0.3]))
    with pytest.raises(CharnnError, match="invalid scores"):
        chooser.choose(np.full((2, 4), np.nan, dtype=np.float32), np.array([0.3, 0.4]))


def test_block_draws_equal_one_draw_per_step():
    """What batched == single relies on: drawing a block gives the numbers drawn one at a time."""
    a = np.random.default_rng(9).random(300)
    g = np.random.default_rng(9)
    assert np.array_equal(a, [g.random() for _ in range(300)])


# -- generation with a trained model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tiny_run):
    import charnn

    return charnn.load(tiny_run)


SEED = "The function "


def greedy_reference(lm, seed: str, length: int) -> str:
    """Argmax decoding the slow, obvious way: the whole model over the whole text at every step."""
    ids = [int(i) for i in lm.vocab.encode(seed)]
    out = []
    with torch.no_grad():
        for _ in range(length):
            logits, _ = lm.model(torch.tensor([ids]))
            nxt = int(logits[0, -1, 1:].argmax()) + 1  # the unknown symbol (id 0) is never generated
            ids.append(nxt)
            out.append(lm.vocab.chars[nxt])
    return "".join(out)


def test_same_random_seed_same_text(lm):
    a = lm.generate(SEED, length=120, random_seed=42)
    b = lm.generate(SEED, length=120, random_seed=42)
    c = lm.generate(SEED, length=120, random_seed=43)
    assert a == b and len(a) == 120
    assert a != c


def test_temperature_zero_is_argmax_decoding(lm):
    assert lm.generate(SEED, length=60, temperature=0) == greedy_reference(lm, SEED, 60)


def test_a_vanishing_temperature_is_greedy(lm):
    greedy = lm.generate(SEED, length=60, temperature=0)
    for tiny in (1e-7, 1e-30, 1e-40, 1e-320):  # 1/T overflows float32 from about 3e-39 on
        assert lm.generate(SEED, length=60, temperature=tiny, random_seed=1) == greedy, tiny


def test_seeds_and_texts_that_are_not_strings_are_clear_errors(lm):
    with pytest.raises(CharnnError, match="the seed must be a string, got int"):
        lm.generate(123)
    with pytest.raises(CharnnError, match="the seed must be a string, got bytes; decode bytes first"):
        lm.generate(b"abc")
    with pytest.raises(CharnnError, match="the text must be a string, got int"):
        lm.next_char_probs(3)


def test_samples_too_large_for_memory_are_refused_before_any_work(lm):
    with pytest.raises(CharnnError, match=r"1 sample of 10,000,000,000 characters need about 74.5 GiB"):
        lm.generate(SEED, length=10**10)
    with pytest.raises(CharnnError, match="ask for fewer characters .length. or samples .num_samples."):
        lm.sample(SEED, length=5, num_samples=10**9)


def test_top_k_one_and_tiny_top_p_are_greedy(lm):
    greedy = lm.generate(SEED, length=80, temperature=0)
    assert lm.generate(SEED, length=80, top_k=1, random_seed=5) == greedy
    assert lm.generate(SEED, length=80, top_k=1, temperature=3.0, random_seed=6) == greedy
    assert lm.generate(SEED, length=80, top_p=1e-9, random_seed=7) == greedy


def test_sampling_options_change_the_text(lm):
    base = lm.generate(SEED, length=200, random_seed=1)
    assert lm.generate(SEED, length=200, random_seed=1, temperature=0.5) != base
    assert lm.generate(SEED, length=200, random_seed=1, top_k=3) != base
    assert lm.generate(SEED, length=200, random_seed=1, top_p=0.5) != base
    low = lm.generate(SEED, length=300, random_seed=1, top_k=2)
    assert "\ufffd" not in base + low


def test_no_seed_starts_from_a_newline(lm):
    assert lm.generate(length=50, random_seed=3) == lm.generate("\n", length=50, random_seed=3)
    assert lm.generate(None, length=0) == ""


def first_stop(text: str, stop: str) -> int:
    return text.index(stop)


def test_stop_string_ends_the_text(lm):
    full = lm.generate(SEED, length=300, random_seed=11)
    stop = full[40:42]
    with pytest.warns(UserWarning, match="cannot match"):  # the snowman is not in the vocabulary
        cut = lm.sample(SEED, length=300, random_seed=11, stop=[stop, "\u2603never"])[0]
    assert cut.text == full[:first_stop(full, stop)]
    assert cut.stop_reason == "stop" and cut.stop == stop and stop not in cut.text
    # several stop strings: the first to appear wins
    other = full[90:93]
    assert lm.generate(SEED, length=300, random_seed=11, stop=[other, stop]) == full[:min(
        first_stop(full, stop), first_stop(full, other))]
    never = "qqqqqqqq"
    assert never not in full and set(never) <= set(lm.vocab.chars)
    missed = lm.sample(SEED, length=300, random_seed=11, stop=[never])[0]
    assert missed.text == full and missed.stop_reason == "length"


def test_stream_yields_characters_and_holds_back_stop_prefixes(lm):
    full = lm.generate(SEED, length=150, random_seed=8)
    chars = list(lm.stream(SEED, length=150, random_seed=8))
    assert all(len(c) == 1 for c in chars) and "".join(chars) == full
    stop = full[100:104]
    run = lm.sampler(SEED, length=150, random_seed=8, stop=[stop])
    pieces = [piece for _, piece in run]
    assert len(pieces) > 20  # streamed, not printed at the end
    assert "".join(pieces) == full[:first_stop(full, stop)] == run.samples[0].text


def test_batched_samples_equal_single_runs(lm):
    """Sample i of a batch with random seed S equals a single run with seed S + i (see charnn.sampling)."""
    batch = lm.sample(SEED, num_samples=4, length=150, random_seed=100)
    assert [s.random_seed for s in batch] == [100, 101, 102, 103]
    assert len({s.text for s in batch}) == 4
    for s in batch:
        single = lm.sample(SEED, length=150, random_seed=s.random_seed)[0]
        assert single.text == s.text
        assert single.avg_logprob == pytest.approx(s.avg_logprob, abs=1e-5)


def test_batched_stop_strings_end_each_sample_on_its_own(lm):
    singles = [lm.generate(SEED, length=200, random_seed=50 + i) for i in range(4)]
    stop = "e "
    batch = lm.sample(SEED, num_samples=4, length=200, random_seed=50, stop=[stop])
    for s, full in zip(batch, singles):
        expected = full[:full.index(stop)] if stop in full else full
        assert s.text == expected


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("auto", 2e-3)])
def test_average_log_probability_matches_score(lm, precision, tol):
    """The sample's log-probability is the model's (scored in fp32); bf16 generation agrees to its rounding."""
    s = lm.sample(SEED, length=80, random_seed=9, temperature=0.7, precision=precision)[0]
    scored = lm.score(s.text, context=SEED)
    assert s.avg_logprob == pytest.approx(scored.logprobs.mean(), abs=tol)
    assert s.avg_logprob < 0


def test_score_and_next_char_probs(lm):
    text = "The value of the argument"
    sc = lm.score(text)
    assert sc.chars == len(text) and sc.total_logprob == pytest.approx(sc.logprobs.sum())
    assert sc.bpc == pytest.approx(-sc.logprobs.mean() / np.log(2))
    # the obvious way: one forward pass over newline + text
    ids = torch.from_numpy(lm.vocab.encode("\n" + text).astype(np.int64))[None]
    with torch.no_grad():
        logits, _ = lm.model(ids[:, :-1])
    ref = torch.log_softmax(logits[0].double(), -1).gather(1, ids[0, 1:, None])[:, 0].numpy()
    np.testing.assert_allclose(sc.logprobs, ref, atol=1e-6)
    np.testing.assert_allclose(lm.score(text, chunk=5).logprobs, ref, atol=1e-6)
    probs = lm.next_char_probs("The valu")
    assert sum(probs.values()) == pytest.approx(1) and len(probs) == len(lm.vocab)
    assert list(probs.values()) == sorted(probs.values(), reverse=True)
    assert probs[text[8]] == pytest.approx(np.exp(lm.score(text[8], context="The valu").total_logprob), rel=1e-5)


@pytest.mark.parametrize("options, message", [({"context": 5}, "context must be a string, got int"),
                                              ({"chunk": 0}, "chunk must be a positive integer, got 0"),
                                              ({"chunk": 2.5}, "chunk must be a positive integer, got 2.5")])
def test_score_refuses_bad_arguments_in_one_line(lm, options, message):
    with pytest.raises(CharnnError, match=message):
        lm.score("text", **options)


def test_load_refuses_an_unknown_which(tiny_run):
    """which="lats" loaded the best model without a word; only best and last exist."""
    import charnn

    with pytest.raises(CharnnError, match="which must be 'best' or 'last', got 'lats'"):
        charnn.load(tiny_run, which="lats")
    assert charnn.load(tiny_run, which="last").checkpoint_path == tiny_run / "last"


def test_unknown_seed_characters_warn_or_fail(lm):
    from charnn.sampling import UnknownCharacterWarning

    with pytest.warns(UnknownCharacterWarning, match="\u2603"):
        text = lm.generate("snow\u2603man", length=20, random_seed=1)
    assert len(text) == 20
    with pytest.raises(CharnnError, match="does not know"):
        lm.generate("snow\u2603man", length=20, strict=True)


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.5), "^temperature "),
    (dict(top_p=0.0), "^top_p "),
    (dict(top_p=1.5), "^top_p "),
    (dict(top_k=0), "^top_k "),
    (dict(length=-1), "^length "),
    (dict(num_samples=0), "^num_samples "),
    (dict(random_seed=-3), "^random_seed "),
    (dict(stop=[""]), "^stop "),
])
def test_bad_options_raise(lm, options, message):
    with pytest.raises(CharnnError, match=message):
        lm.sample(SEED, **options)


def test_custom_cell_models_generate_through_the_fallback(tiny_run):
    from charnn.lm import LanguageModel
    from charnn.checkpoint import load_checkpoint

    vocab = load_checkpoint(tiny_run).vocab
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(vocab), layers=1, hidden=16, embed_dim=8, gate_slope=2.0)).eval()
    lm = LanguageModel(model, vocab)
    assert lm.stepper.backend == "model"
    batch = lm.sample("ab", num_samples=3, length=30, random_seed=4)
    assert [s.text for s in batch] == [lm.generate("ab", length=30, random_seed=4 + i) for i in range(3)]


# -- the command line ----------------------------------------------------------------------------------------
def cli(*args):
    from charnn.cli import main

    return CliRunner().invoke(main, ["sample", *map(str, args)])


def test_cli_text_and_repeatability(tiny_run, lm):
    a = cli(tiny_run, "--seed", SEED, "--length", 80, "--random-seed", 3)
    b = cli(tiny_run, "--seed", SEED, "--length", 80, "--random-seed", 3)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout == SEED + lm.generate(SEED, length=80, random_seed=3) + "\n"
    hidden = cli(tiny_run, "--seed", SEED, "-n", 80, "--random-seed", 3, "--hide-seed")
    assert hidden.stdout == a.stdout[len(SEED):]
    unseeded = cli(tiny_run, "--seed", SEED, "-n", 10)
    assert "random seed" in unseeded.stderr


def test_cli_json_batch_matches_single_runs(tiny_run):
    result = cli(tiny_run, "--seed", SEED, "-n", 100, "--num-samples", 4, "--random-seed", 20, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["seed"] == SEED and len(report["samples"]) == 4
    for i, s in enumerate(report["samples"]):
        assert s["random_seed"] == 20 + i and isinstance(s["avg_logprob"], float)
        single = json.loads(cli(tiny_run, "--seed", SEED, "-n", 100, "--random-seed", 20 + i, "--json").stdout)
        assert single["samples"][0]["text"] == s["text"]


def test_cli_batch_text_is_separated(tiny_run, lm):
    result = cli(tiny_run, "--seed", SEED, "-n", 40, "--num-samples", 3, "--random-seed", 7)
    assert result.exit_code == 0, result.output
    texts = [s.text for s in lm.sample(SEED, num_samples=3, length=40, random_seed=7)]
    expected = "".join(f"=== sample {i + 1}/3 (random seed {7 + i}) ===\n{SEED}{t}" + ("" if t.endswith("\n") else "\n")
                       for i, t in enumerate(texts))
    assert result.stdout == expected


def test_cli_stop_and_temperature_zero(tiny_run, lm):
    full = lm.generate(SEED, length=200, temperature=0)
    stop = full[30:32]
    result = cli(tiny_run, "--seed", SEED, "-n", 200, "-t", 0, "--stop", stop, "--stop", "\u2603", "--hide-seed")
    assert result.exit_code == 0, result.output
    assert result.stdout == full[:full.index(stop)] + "\n"
    assert "cannot match" in result.stderr  # the snowman is not in the vocabulary


def test_cli_top_k_one_is_greedy(tiny_run):
    greedy = cli(tiny_run, "--seed", SEED, "-n", 60, "--temperature", 0)
    top1 = cli(tiny_run, "--seed", SEED, "-n", 60, "--top-k", 1, "--random-seed", 9)
    assert greedy.exit_code == top1.exit_code == 0 and greedy.stdout == top1.stdout


def test_cli_default_checkpoint_is_the_latest_run(tiny_run, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "checkpoints" / "mine")
    monkeypatch.chdir(tmp_path)
    result = cli("--seed", SEED, "-n", 20, "--random-seed", 1)
    assert result.exit_code == 0, result.output
    assert "sampling from checkpoints/mine/best" in result.stderr.replace(os.sep, "/")
    last = cli("--seed", SEED, "-n", 20, "--random-seed", 1, "--last")
    assert "checkpoints/mine/last" in last.stderr.replace(os.sep, "/")


def test_default_checkpoint_skips_a_newer_classifier(tiny_run, tmp_path, monkeypatch):
    """sample, complete and charnn.load(None) take the latest *language model*: a classifier trained since (as the
    README's own example does under checkpoints/) made them fail with 'is a classifier checkpoint'."""
    import shutil

    from charnn import TextClassifier, load
    from charnn.cli import main

    shutil.copytree(tiny_run, tmp_path / "checkpoints" / "lm")
    monkeypatch.chdir(tmp_path)
    TextClassifier(hidden=8, embed_dim=4, max_steps=2, val_fraction=0.0, out="checkpoints/clf").fit(["ab", "ba"] * 8, ["x", "y"] * 8)
    result = cli("--seed", SEED, "-n", 20, "--random-seed", 1)
    assert result.exit_code == 0, result.output
    assert "sampling from checkpoints/lm/best" in result.stderr.replace(os.sep, "/")
    assert load(None).checkpoint_path.parent.name == "lm"
    completed = CliRunner().invoke(main, ["complete", "--k", "2"], input="To be or no\n")
    assert completed.exit_code == 0, completed.output
    shutil.rmtree(tmp_path / "checkpoints" / "lm")  # only a classifier left: say what is missing
    one_line_error(cli("--seed", SEED, "-n", 5), "no language model under checkpoints/; train one with charnn train")


def test_cli_unknown_seed_characters(tiny_run):
    warned = cli(tiny_run, "--seed", "snow\u2603", "-n", 10, "--random-seed", 1)
    assert warned.exit_code == 0 and "warning:" in warned.stderr and "\u2603" in warned.stderr
    assert warned.stdout.startswith("snow\u2603")
    strict = cli(tiny_run, "--seed", "snow\u2603", "-n", 10, "--strict")
    assert strict.exit_code == 2 and strict.stderr.startswith("error:") and "--strict" in strict.stderr


def one_line_error(result, *words):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "1.01"], ["--top-p"]),
    (["--top-k", "0"], ["--top-k"]),
    (["--length", "-5"], ["--length"]),
    (["--num-samples", "0"], ["--num-samples"]),
])
def test_cli_bad_options(tiny_run, args, words):
    one_line_error(cli(tiny_run, "--seed", SEED, *args), *words)


def test_cli_missing_partial_and_corrupt_checkpoints(tiny_run, tmp_path):
    import shutil

    one_line_error(cli(tmp_path / "nowhere"), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli(empty), "not a charnn checkpoint")
    (tmp_path / "cwd").mkdir()
    os.chdir(tmp_path / "cwd")
    try:
        one_line_error(cli(), "no language model under checkpoints/")
    finally:
        os.chdir(Path(__file__).resolve().parents[1])

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(tiny_run / "best", d)
        damage(d)
        return d

    partial = broken("no-weights", lambda d: (d / "model.safetensors").unlink())
    one_line_error(cli(partial), "not a charnn checkpoint")
    no_vocab = broken("no-vocab", lambda d: (d / "vocab.json").unlink())
    one_line_error(cli(no_vocab), "vocab.json", "missing")
    cut = broken("cut-weights", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]))
    one_line_error(cli(cut), "damaged")
    garbage = broken("bad-config", lambda d: (d / "config.json").write_text("{not json"))
    one_line_error(cli(garbage), "config.json", "damaged")
    zeros = broken("zero-weights", lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64))
    one_line_error(cli(zeros), "damaged")


def test_console_script_runs(tiny_run, lm):
    """The installed `charnn` entry point, as a user runs it."""
    exe = Path(sys.executable).parent / "charnn"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "charnn.cli"]
    done = subprocess.run(cmd + ["sample", str(tiny_run), "--seed", SEED, "-n", "50", "-t", "0", "--hide-seed"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == lm.generate(SEED, length=50, temperature=0) + "\n"
    bad = subprocess.run(cmd + ["sample", str(tiny_run), "--top-k", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --top-k must be at least 1, got 0"]


class FakeStdout:
    """Records writes and flushes; claims to be a terminal or not."""

    def __init__(self, tty: bool):
        self.tty, self.writes, self.flushes = tty, [], 0

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


@pytest.mark.parametrize("tty", [True, False])
def test_cli_streams_to_a_terminal_and_buffers_otherwise(lm, monkeypatch, tty):
    from charnn.cli.sample import _stream_text

    fake = FakeStdout(tty)
    monkeypatch.setattr(sys, "stdout", fake)
    _stream_text(lm.sampler(SEED, length=60, random_seed=2), SEED)
    assert "".join(fake.writes) == SEED + lm.generate(SEED, length=60, random_seed=2) + "\n"
    assert fake.flushes >= 60 if tty else fake.flushes == 1


def test_blas_threads_restores_the_setting():
    from charnn import inference

    with inference.blas_threads(1):
        with inference.blas_threads(2):
            pass
    if inference._BLAS:  # NumPy's bundled OpenBLAS: the thread count is back where it was
        before = inference._BLAS[1]()
        with inference.blas_threads(1):
            assert inference._BLAS[1]() == 1
        assert inference._BLAS[1]() == before
    assert inference._BLAS_USERS == 0


def test_thread_tuner_keeps_the_faster_option():
    from charnn.inference import _ThreadTuner

    tuner = _ThreadTuner([1, 2])
    cost = {1: 1.0, 2: 0.5}
    picks = []
    for _ in range(2 * _ThreadTuner.EVERY):
        w = tuner.pick()
        picks.append(w)
        tuner.record(w, cost[w])
    probes = 2 * _ThreadTuner.PROBE
    assert picks[:probes] == [1] * _ThreadTuner.PROBE + [2] * _ThreadTuner.PROBE  # both timed ...
    assert set(picks[probes:_ThreadTuner.EVERY]) == {2}  # ... then the faster kept
    cost = {1: 0.2, 2: 0.5}  # the machine got busy: one thread is now faster
    for _ in range(_ThreadTuner.EVERY):
        w = tuner.pick()
        tuner.record(w, cost[w])
    assert tuner.best == 1


@pytest.mark.parametrize("options, message", [({"length": True}, "^length must be 0 or more, got True"),
                                              ({"top_k": np.int64(3), "temperature": np.float32(0.5)}, None)])
def test_sampling_settings_take_numpy_numbers_but_not_bools(lm, options, message):
    if message is None:
        assert len(lm.generate("The ", **{"length": 5, **options})) == 5
        return
    with pytest.raises(CharnnError, match=message):
        lm.generate("The ", **options)


def test_the_start_of_line_prime_is_never_reported_as_the_callers_text():
    """A model whose corpus had no newline warned 'the seed has characters the model does not know: \\n' for an
    empty seed, and score/next_char_probs did the same: the newline was charnn's own prime, not the caller's."""
    import warnings

    from charnn.lm import LanguageModel
    from charnn.sampling import UnknownCharacterWarning
    from charnn.vocab import Vocabulary

    vocab = Vocabulary(list("ab "))
    torch.manual_seed(0)
    lm = LanguageModel(CharRNN(ModelConfig(vocab_size=len(vocab), hidden=8, embed_dim=4)), vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate("", length=5, random_seed=1)
        lm.generate(None, length=5, random_seed=1, strict=True)
        lm.score("ab ab")
        lm.next_char_probs("")
    with pytest.warns(UnknownCharacterWarning, match=r"the seed has characters the model does not know: 'z'"):
        lm.generate("az", length=3, random_seed=1)
    with pytest.warns(UnknownCharacterWarning, match=r"'\\n'"):  # a newline the caller wrote is still reported
        lm.score("a\nb", context="b")
