"""The native (C) generation kernel: the same numbers as the NumPy stepper, independent of batch and threads."""

import numpy as np
import pytest
import torch

from charnn import native
from charnn.errors import CharnnError
from charnn.inference import Stepper
from charnn.lm import LanguageModel
from charnn.model import CharRNN, ModelConfig
from charnn.sampling import SampleRun, SamplingOptions
from charnn.vocab import Vocabulary

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"the native kernel is unavailable here: {native.unavailable_reason()}")

CHARS = "\nabcdefghijklmnopqrstuvwxyz .,;:!?'ABCDEFGHIJ"
CASES = {
    "lstm-2": dict(cell="lstm", layers=2),
    "lstm-3-onehot": dict(cell="lstm", layers=3, embed_dim=0),
    "gru-2": dict(cell="gru", layers=2),
    "rnn-tanh": dict(cell="rnn", layers=2),
    "rnn-relu": dict(cell="rnn", layers=1, activation="relu"),
    "lstm-tied-projection": dict(cell="lstm", tie_weights=True, embed_dim=12),
}
PRECISIONS = ["fp32"] + (["bf16"] if native.supports_bf16() else [])


def make_model(seed=0, hidden=37, **overrides) -> CharRNN:
    """Odd sizes on purpose: parts of unequal width and padded columns."""
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(vocab_size=len(CHARS) + 1, hidden=hidden, **{"embed_dim": 8, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.3)
    return model.eval()


def run_steps(step, stepper, ids):
    state, out = stepper.initial_state(ids.shape[0]), []
    for t in range(ids.shape[1]):
        logits, state = step(ids[:, t], state)
        out.append(logits)
    return np.stack(out), state


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_step_matches_numpy_stepper(case, precision):
    """fp32 equals the NumPy stepper to float rounding; bf16 to bf16 rounding (8-bit mantissas)."""
    stepper = Stepper(make_model(**CASES[case]))
    engine = native.NativeGenerator(stepper, precision)
    ids = np.random.default_rng(1).integers(0, stepper.vocab_size, (3, 20))
    ref, ref_state = run_steps(stepper.step_arrays, stepper, ids)
    got, state = run_steps(engine.step, stepper, ids)
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=0.05, atol=0.03)
    np.testing.assert_allclose(got, ref, **tol)
    np.testing.assert_allclose(state.h, ref_state.h, **tol)
    if precision == "bf16":  # rounding, not a different model: the likeliest character agrees almost always
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rows_do_not_depend_on_batch_or_threads(precision):
    """Each row is one chain of multiply-adds: alone or in a batch, on one thread or two, bit for bit."""
    stepper = Stepper(make_model(cell="lstm", layers=2, hidden=64))
    ids = np.random.default_rng(2).integers(0, stepper.vocab_size, (7, 10))
    runs = {}
    for threads in (1, 2):
        engine = native.NativeGenerator(stepper, precision, threads=threads)
        runs[threads, "batch"] = run_steps(engine.step, stepper, ids)[0]
        runs[threads, "row 5"] = run_steps(engine.step, stepper, ids[5:6])[0]
        engine.close()
    for got in runs.values():
        np.testing.assert_array_equal(got[:, -1] if got.shape[1] == 1 else got[:, 5], runs[1, "row 5"][:, 0])
    np.testing.assert_array_equal(runs[1, "batch"], runs[2, "batch"])


def test_step_leaves_input_state_and_checks_ids():
    stepper = Stepper(make_model())
    engine = stepper.native("fp32")
    state = stepper.initial_state(2)
    before = state.h.copy()
    engine.step(np.array([1, 2]), state)
    np.testing.assert_array_equal(state.h, before)
    with pytest.raises(CharnnError, match="ids must lie"):
        engine.step(np.array([1, 999]), state)
    with pytest.raises(CharnnError, match="one id per state row"):
        engine.step(np.array([1]), state)


@pytest.fixture()
def lm():
    return LanguageModel(make_model(cell="lstm", layers=2, hidden=48), Vocabulary(CHARS))


def numpy_only(lm, monkeypatch):
    monkeypatch.setattr(lm.stepper, "native", lambda *a, **k: None)


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.8, top_k=5),
                                     dict(temperature=1.2, top_p=0.7), dict(temperature=1.0)])
def test_fp32_kernel_generates_what_the_numpy_loop_generates(lm, monkeypatch, options):
    """Same uniforms, same choice arithmetic: the fp32 kernel's text equals the NumPy loop's."""
    got = lm.sample("the ", length=300, random_seed=3, num_samples=2, precision="fp32", **options)
    numpy_only(lm, monkeypatch)
    ref = lm.sample("the ", length=300, random_seed=3, num_samples=2, **options)
    assert [s.text for s in got] == [s.text for s in ref]
    for a, b in zip(got, ref):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-5)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batch_equals_single_runs_and_repeats(lm, precision):
    """Sample i of a batch is the single run with seed S+i, exactly; the same seed repeats exactly."""
    batch = lm.sample("a", length=400, random_seed=10, num_samples=4, precision=precision, stop=["q"])
    singles = [lm.sample("a", length=400, random_seed=10 + i, precision=precision, stop=["q"])[0] for i in range(4)]
    assert [s.text for s in batch] == [s.text for s in singles]
    again = lm.sample("a", length=400, random_seed=10, num_samples=4, precision=precision, stop=["q"])
    assert [s.text for s in again] == [s.text for s in batch]


def test_stop_and_streaming_with_blocks(lm):
    """Stops end a sample mid-block; streamed pieces concatenate to the returned text."""
    full = lm.generate("x", length=1500, random_seed=4)
    stop = full[1000:1003]
    run = lm.sampler("x", length=1500, random_seed=4, stop=[stop])
    pieces = [piece for _, piece in run]
    assert run.engine.startswith("native")
    assert "".join(pieces) == full[:full.index(stop)] == run.samples[0].text
    assert len(pieces) > 100


def test_precision_is_validated(lm, monkeypatch):
    with pytest.raises(CharnnError, match="^precision must be one of"):
        SamplingOptions(precision="fp8")
    monkeypatch.setattr(native, "supports_bf16", lambda: False)
    with pytest.raises(CharnnError, match="AVX512-BF16"):
        lm.sample("a", length=5, precision="bf16")
    assert lm.sample("a", length=5, precision="auto", random_seed=1)[0].text  # auto falls back to fp32


def test_without_a_compiler_charnn_falls_back_to_numpy(tmp_path, monkeypatch):
    """No C compiler: a one-line reason, and sampling still works on the NumPy stepper."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("CHARNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler-charnn")
    assert native.library() is None
    assert "no C compiler" in native.unavailable_reason()
    lm = LanguageModel(make_model(), Vocabulary(CHARS))
    run = SampleRun(lm.stepper, lm.vocab, "a", SamplingOptions(length=20, random_seed=1))
    assert len(run.run()[0].text) == 20 and run.engine == "numpy"
    with pytest.raises(CharnnError, match="use precision='fp32'"):
        lm.sample("a", length=5, precision="bf16")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("CHARNN_NATIVE", "0")
    monkeypatch.delenv("CC")
    assert native.library() is None and "CHARNN_NATIVE=0" in native.unavailable_reason()


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    """The library is compiled once into the cache directory; no temporary files are left behind."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("CHARNN_CACHE_DIR", str(tmp_path))
    assert native.library() is not None
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith(".so")


@pytest.mark.parametrize("engine", ["native", "numpy"])
def test_streaming_flushes_what_a_stop_prefix_held_back(lm, monkeypatch, engine):
    """Text that might begin a stop string is held back; at the length limit it is streamed after all."""
    if engine == "numpy":
        numpy_only(lm, monkeypatch)
    full = lm.generate("x", length=200, random_seed=5)
    stop = full[-1] + "JJJJJ"
    assert stop not in full
    run = lm.sampler("x", length=200, random_seed=5, stop=[stop])
    pieces = [piece for _, piece in run]
    assert "".join(pieces) == full == run.samples[0].text
    assert pieces[-1].endswith(full[-1])
