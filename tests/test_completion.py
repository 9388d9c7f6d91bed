"""The autocomplete engine: beam search, modes, incremental state, evaluation and the complete CLI."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from charnn import Completer, Suggestion
from charnn.cli import main
from charnn.completion import PHRASE_END, is_word_char
from charnn.completion_eval import DictionaryCompleter, evaluate_completion, fits, keystrokes, training_text
from charnn.errors import CharnnError
from charnn.lm import load_language_model

TEXT = "The interpreter reads a line of input, and the result of the expression is printed. "


@pytest.fixture(scope="module")
def completer(tiny_run) -> Completer:
    return Completer(tiny_run)


@pytest.fixture(scope="module")
def lm(tiny_run):
    model, ck = load_language_model(tiny_run)
    return model, ck.vocab


def exact_logprob(lm, context: str, continuation: str) -> float:
    """log P(continuation | context) by the chain rule, from one plain forward pass."""
    model, vocab = lm
    ids = torch.as_tensor(vocab.encode(context + continuation).astype("int64"))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0][0].double(), -1)
    n = len(context)
    return sum(float(logp[n - 1 + i, ids[0, n + i]]) for i in range(len(continuation)))


def boundary_logprob(lm, text: str, chars) -> float:
    """log P(next character is one of ``chars`` | text)."""
    model, vocab = lm
    ids = torch.as_tensor(vocab.encode(text).astype("int64"))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0][0, -1].double(), -1)
    picked = [i for i, c in enumerate(vocab.chars) if i > 0 and c in chars]
    return float(torch.logsumexp(logp[picked], 0))


# -- suggestions -------------------------------------------------------------------------------
def one_word(text: str, leading_space: bool) -> bool:
    word = text[1:] if leading_space and text.startswith(" ") else text
    return bool(word) and all(is_word_char(c) for c in word)


def test_word_mode_completes_the_current_word_or_proposes_the_next(completer):
    found = completer.suggest("The interpreter reads a li", k=3)
    assert 1 <= len(found) <= 3
    assert all(isinstance(s, Suggestion) for s in found)
    assert all(one_word(s.text, leading_space=True) and s.complete for s in found)
    wide = completer.suggest("The interpreter reads a li", k=10)
    assert any(not s.text.startswith(" ") for s in wide)  # more of "li..."
    assert any(s.text.startswith(" ") for s in completer.suggest("The result of the", k=10))  # "the" is a word
    assert [s.score for s in found] == sorted((s.score for s in found), reverse=True)
    assert all(0 < s.probability <= 1 for s in found)
    assert len({s.text for s in found}) == len(found)


def test_word_mode_after_a_space_proposes_a_next_word_and_after_punctuation_a_spaced_word(completer):
    for s in completer.suggest("The interpreter reads a ", k=3):
        assert one_word(s.text, leading_space=False)
    for s in completer.suggest("The interpreter reads a line,", k=3):
        assert one_word(s.text, leading_space=True)


def test_word_probability_is_the_chain_rule_probability_of_the_word_then_a_boundary(completer, lm):
    context = "The interpreter reads a li"
    vocab = lm[1]
    non_word = [c for c in vocab.chars[1:] if not is_word_char(c)]
    for s in completer.suggest(context, k=3):
        expected = exact_logprob(lm, context, s.text) + boundary_logprob(lm, context + s.text, non_word)
        assert math.log(s.probability) == pytest.approx(expected, abs=1e-4)


def test_a_wide_beam_finds_the_likeliest_corpus_word(tiny_run, lm, docs_text):
    wide = Completer(tiny_run, beam_width=64, length_penalty=0.0)
    context = "The result of the "
    best = wide.suggest(context, k=1)[0]
    model, vocab = lm
    words = sorted(set(re.findall(r"[\w']+", docs_text[:60_000])))
    width = max(map(len, words)) + 1
    rows = [vocab.encode(context + w + " " * (width - len(w))).astype("int64") for w in words]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.as_tensor(np.stack(rows)))[0].double(), -1)  # one batched pass
    non_word = [i for i, c in enumerate(vocab.chars) if i > 0 and not is_word_char(c)]
    n = len(context)
    for row, word in enumerate(words):
        chain = sum(float(logp[row, n - 1 + i, rows[row][n + i]]) for i in range(len(word)))
        lp = chain + float(torch.logsumexp(logp[row, n - 1 + len(word), non_word], 0))
        assert lp <= math.log(best.probability) + 1e-6, word


def test_phrase_and_line_modes_stop_at_their_boundaries(completer):
    for s in completer.suggest("The interpreter reads", k=3, mode="phrase", max_chars=40):
        body = s.text[:-1] if s.text[-1] in PHRASE_END else s.text
        assert "\n" not in s.text and not any(c in PHRASE_END for c in body)
        if s.complete and s.text[-1] not in PHRASE_END:
            assert len(s.text) < 40  # ended at a line end
    for s in completer.suggest("The interpreter reads", k=3, mode="line", max_chars=40):
        assert "\n" not in s.text and len(s.text) <= 40


def test_max_chars_cuts_suggestions_and_marks_them_incomplete(completer):
    found = completer.suggest("The interpreter", k=3, mode="line", max_chars=3)
    assert found and all(len(s.text) <= 3 for s in found)
    assert any(not s.complete for s in found)


def test_suggestions_are_deterministic_and_independent_of_the_cache(tiny_run, completer):
    a = completer.suggest(TEXT, k=3, mode="phrase")
    assert completer.suggest(TEXT, k=3, mode="phrase") == a
    fresh = Completer(tiny_run).suggest(TEXT, k=3, mode="phrase")
    assert [s.text for s in fresh] == [s.text for s in a]
    assert [s.probability for s in fresh] == pytest.approx([s.probability for s in a], rel=1e-4)


def test_empty_text_and_unknown_characters_are_fine(completer):
    assert all(s.text for s in completer.suggest("", k=3))
    assert isinstance(completer.suggest("日本語 text ", k=2), list)
    probs = completer.next_char_probs("The interp")
    assert probs.shape == (len(completer.vocab),) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="sentence"), "mode must be one of"),
    (dict(k=0), "k must be an integer from 1 to 100"),
    (dict(k=True), "k must be an integer from 1 to 100"),
    (dict(k=10**6), "k must be an integer from 1 to 100"),
    (dict(k=2.0), "k must be an integer from 1 to 100"),
    (dict(max_chars=0), "max_chars must be an integer from 1 to 1000"),
])
def test_bad_arguments_raise_charnn_errors(completer, kwargs, message):
    with pytest.raises(CharnnError, match=message):
        completer.suggest("abc", **kwargs)


def test_numpy_integers_are_accepted(completer):
    import numpy as np

    assert completer.suggest("abc", k=np.int64(2)) == completer.suggest("abc", k=2)


def test_bad_construction_raises_charnn_errors(tiny_run, lm):
    with pytest.raises(CharnnError, match="vocabulary"):
        Completer(lm[0])
    with pytest.raises(CharnnError, match="beam_width"):
        Completer(lm[0], vocab=lm[1], beam_width=0)
    with pytest.raises(CharnnError, match="checkpoint path or a trained model"):
        Completer(42)
    assert Completer(lm[0], vocab=lm[1]).suggest("The inte", k=1)
    # settings of the wrong type are refused at construction (beam_width=2.5 constructed, then every suggest
    # failed with 'Partition index must be integer'; cache_size=2.5 and context_chars=100.5 were taken)
    for settings, message in ((dict(beam_width=2.5), "beam_width must be an integer of at least 1, got 2.5"),
                              (dict(beam_width="8"), "beam_width must be an integer of at least 1, got '8'"),
                              (dict(length_penalty="0.5"), "length_penalty must be a finite number of 0 or more, got '0.5'"),
                              (dict(cache_size=2.5), "cache_size must be an integer of at least 1, got 2.5"),
                              (dict(context_chars=100.5), "context_chars must be an integer of at least 2, got 100.5"),
                              (dict(checkpoint_every=1.5), "checkpoint_every must be an integer of at least 1, got 1.5")):
        with pytest.raises(CharnnError, match=re.escape(message)):
            Completer(lm[0], vocab=lm[1], **settings)
    with pytest.raises(CharnnError, match="text must be a string, got int"):  # it was a TypeError about len()
        Completer(lm[0], vocab=lm[1]).next_char_probs(5)


# -- incremental state -----------------------------------------------------------------------
def test_typing_one_character_costs_one_recurrent_step(tiny_run):
    c = Completer(tiny_run)
    c.suggest(TEXT[:40])
    for i in range(41, 60):
        before = c.chars_read
        c.suggest(TEXT[:i])
        assert c.chars_read - before == 1


def test_backspace_and_edits_reuse_the_longest_cached_prefix(tiny_run):
    c = Completer(tiny_run, checkpoint_every=16)
    text = TEXT * 2
    for i in range(len(text) - 10, len(text) + 1):  # typed: every prefix on the way is cached
        c.suggest(text[:i])
    before = c.chars_read
    c.suggest(text[:-1])  # backspace
    c.suggest(text[:-5])
    assert c.chars_read == before
    c.suggest(text[:-20])  # further back than typed: from the checkpoint below it
    assert c.chars_read - before <= 16
    before = c.chars_read
    c.suggest(text[:100] + "X" + text[101:])  # an edit: re-read from the checkpoint at 96
    assert c.chars_read - before == len(text) - 96


def test_long_documents_read_only_the_last_context_chars(tiny_run):
    c = Completer(tiny_run, context_chars=64)
    long = TEXT * 10
    start = c.context_start(len(long))
    assert 0 < len(long) - start <= 64 and start % 32 == 0
    found = c.suggest(long)
    assert c.chars_read <= 64
    assert found == Completer(tiny_run, context_chars=64).suggest(long[start:])
    before = c.chars_read
    c.suggest(long + "T")
    assert c.chars_read - before in (1, len(long) + 1 - c.context_start(len(long) + 1))


def test_the_state_cache_is_bounded(tiny_run):
    c = Completer(tiny_run, cache_size=4, checkpoint_every=8)
    for i in range(10, 60, 3):
        c.suggest(TEXT[:i])
    assert c.info()["cached_states"] <= 4


def test_concurrent_suggestions_match_sequential_ones(tiny_run):
    c = Completer(tiny_run)
    texts = [TEXT[:n] for n in range(20, 60, 4)]
    sequential = Completer(tiny_run)
    expected = [[s.text for s in sequential.suggest(t)] for t in texts]
    results: dict[int, list] = {}

    def worker(i):
        for _ in range(3):
            results[i] = [s.text for s in c.suggest(texts[i])]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(texts))] == expected


# -- evaluation -------------------------------------------------------------------------------
def test_dictionary_baseline_proposes_the_most_frequent_words_with_the_prefix():
    d = DictionaryCompleter("the the the then then there they them them them them x")
    assert [s.text for s in d.suggest("so th", k=3)] == ["em", "e", "en"]
    assert [s.text for s in d.suggest("so the", k=2)] == ["m", "n"]
    assert [s.text for s in d.suggest("so ", k=2)] == ["them", "the"]
    assert [s.text for s in d.suggest("so,", k=1)] == [" them"]
    assert [s.text for s in d.suggest("so th", k=3, max_chars=1)] == ["e"]  # the model's --max-chars binds it too
    assert [s.text for s in d.suggest("so,", k=3, max_chars=4)] == [" the", " x"]  # the leading space counts
    with pytest.raises(CharnnError, match="no words"):
        DictionaryCompleter("  ,, ")


def test_keystroke_count_follows_the_acceptance_rule():
    doc = "the cat sat"
    s = lambda *texts: [Suggestion(t, 0.5, 0.0) for t in texts]  # noqa: E731
    suggestions = [s() for _ in doc]
    suggestions[0] = s("then", "the")  # top-1 is not the whole word typed; the top-3 user takes "the"
    suggestions[5] = s("at")  # after "the c"
    assert keystrokes(doc, suggestions, 1, "word") == 10  # t h e _ c Tab _ s a t
    assert keystrokes(doc, suggestions, 3, "word") == 8  # Tab _ c Tab _ s a t
    assert fits("the cat", 0, Suggestion("the", 1, 0), "word") and not fits("then", 0, Suggestion("the", 1, 0), "word")
    assert fits("then", 0, Suggestion("the", 1, 0, complete=False), "word")
    assert fits("a b, c", 2, Suggestion("b,", 1, 0), "phrase") and not fits("a b c\n", 0, Suggestion("a b", 1, 0), "line")


def test_evaluate_completion_reports_savings_accuracy_and_latency(completer, small_corpus):
    doc = small_corpus.read_text(encoding="utf-8")[-400:]
    dictionary = DictionaryCompleter(small_corpus.read_text(encoding="utf-8")[:50_000])
    r = evaluate_completion(completer, doc, dictionary=dictionary, progress=False)
    assert r["chars"] == 400
    for part in (r["model"], r["dictionary"]):
        assert 0 <= part["savings_top1"] <= part["savings_top3"] < 100
        assert part["keystrokes_top3"] <= part["keystrokes_top1"] <= 400
    assert 0 <= r["next_char_top1"] <= r["next_char_top5"] <= 100
    assert r["next_char_top5"] > 20  # even a tiny model knows English letters
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert r["savings_top3_gain_points"] == pytest.approx(r["model"]["savings_top3"] - r["dictionary"]["savings_top3"])


def test_training_text_is_the_first_part_of_the_recorded_corpus(tiny_run, small_corpus):
    from charnn import checkpoint as ckpt

    text = small_corpus.read_text(encoding="utf-8")
    train = training_text(ckpt.load_checkpoint(tiny_run).config)
    assert text.startswith(train) and 0.85 * len(text) < len(train) < len(text)
    with pytest.raises(CharnnError, match="--train-text"):
        training_text({"training": {"corpus": ["/nonexistent/corpus.txt"]}})


def test_eval_complete_cli_prints_one_json_object(tiny_run, small_corpus, tmp_path):
    doc = tmp_path / "typed.txt"
    doc.write_text(small_corpus.read_text(encoding="utf-8")[-300:], encoding="utf-8")
    result = CliRunner().invoke(main, ["eval-complete", str(tiny_run), str(doc), "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["chars"] == 300 and "dictionary" in report and report["latency_ms"]["p99"] > 0
    text = CliRunner().invoke(main, ["eval-complete", str(tiny_run), str(doc), "--limit", "100", "-q", "--no-baseline"])
    assert text.exit_code == 0 and "savings" in text.stdout and "p99" in text.stdout
    missing = CliRunner().invoke(main, ["eval-complete", str(tiny_run), str(tmp_path / "none.txt")])
    assert missing.exit_code == 2 and "error:" in missing.output
    for unused in (["--no-baseline"], ["--mode", "line"]):  # no dictionary to build: the option would be ignored
        ignored = CliRunner().invoke(main, ["eval-complete", str(tiny_run), str(doc), "-q", "--train-text", str(doc), *unused])
        assert ignored.exit_code == 2 and ignored.stderr.startswith("error: --train-text feeds the dictionary"), ignored.output


def test_eval_complete_of_a_one_character_file_says_so(tiny_run, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a", encoding="utf-8")
    result = CliRunner().invoke(main, ["eval-complete", str(tiny_run), str(one), "--json", "-q"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "error: the text to type holds 1 character(s); pass a file with at least 2\n"


def test_eval_complete_json_interrupted_prints_one_json_object(tiny_run, small_corpus, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("charnn.completion_eval.evaluate_completion", ctrl_c)
    result = CliRunner().invoke(main, ["eval-complete", str(tiny_run), str(small_corpus), "--json", "-q"])
    assert result.exit_code == 130, result.output
    assert json.loads(result.stdout) == {"interrupted": True, "checkpoint": str(tiny_run), "file": str(small_corpus)}
    assert "interrupted" in result.stderr and "Aborted" not in result.output


def test_complete_json_interrupted_prints_one_json_object(tiny_run, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("charnn.completion.Completer.suggest", ctrl_c)
    result = CliRunner().invoke(main, ["complete", str(tiny_run), "--json"], input="To be or\n")
    assert result.exit_code == 130, result.output
    assert json.loads(result.stdout) == {"interrupted": True, "checkpoint": str(tiny_run), "mode": "word", "k": 3}
    assert "interrupted" in result.stderr and "Aborted" not in result.output


def test_complete_pipe_mode_splits_lines_at_newlines_only(tiny_run):
    result = CliRunner().invoke(main, ["complete", str(tiny_run), "--json"], input="ab\x0ccd\u2028e\r\nf\n\n")
    assert result.exit_code == 0, result.output
    assert [i["text"] for i in json.loads(result.stdout)["inputs"]] == ["ab\x0ccd\u2028e", "f", ""]


def test_complete_refuses_stdin_that_is_not_utf8(tiny_run):
    for args in (["--json"], []):
        result = CliRunner().invoke(main, ["complete", str(tiny_run), *args], input=b"caf\xe9 au lait\n")
        assert result.exit_code == 2, result.output
        assert result.stdout == "" and "Traceback" not in result.output
        assert result.stderr.startswith("error: standard input is not valid utf-8 (byte 3")
        assert result.stderr.count("\n") == 1
    ok = CliRunner().invoke(main, ["complete", str(tiny_run), "--json"], input="caf\u00e9\n".encode())
    assert ok.exit_code == 0 and json.loads(ok.stdout)["inputs"][0]["text"] == "caf\u00e9"


# -- the terminal command ----------------------------------------------------------------------
def _console_script() -> str:
    script = Path(sys.executable).with_name("charnn")
    if not script.exists():
        script = shutil.which("charnn")
    if not script:
        pytest.skip("the charnn console script is not installed (pip install -e .)")
    return str(script)


def test_complete_pipe_mode_through_the_console_script(tiny_run, completer):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run([_console_script(), "complete", str(tiny_run), "--k", "3"], input="The interpreter reads a li\n",
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    expected = completer.suggest("The interpreter reads a li", k=3)
    assert [json.loads(line.split("\t")[0]) for line in lines] == [s.text for s in expected]
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx([s.probability for s in expected], abs=1e-4)


def test_complete_pipe_mode_json_several_lines_and_empty_input(tiny_run):
    two = CliRunner().invoke(main, ["complete", str(tiny_run), "--json", "--mode", "line"], input="The inter\nA line of\n")
    assert two.exit_code == 0, two.output
    report = json.loads(two.stdout)
    assert [i["text"] for i in report["inputs"]] == ["The inter", "A line of"] and report["mode"] == "line"
    assert all(all("\n" not in s["text"] for s in i["suggestions"]) for i in report["inputs"])
    plain = CliRunner().invoke(main, ["complete", str(tiny_run), "--k", "2"], input="The inter\nA line of\n")
    assert plain.stdout.count("> ") == 2
    empty = CliRunner().invoke(main, ["complete", str(tiny_run)], input="")
    assert empty.exit_code == 2 and "error: no text on standard input" in empty.output


def test_interactive_prompt_tab_accepts_the_first_suggestion(completer):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from charnn.cli.complete import interactive

    first = completer.suggest("The interpreter reads a li", k=3)[0].text
    with create_pipe_input() as pipe:
        pipe.send_text("The interpreter reads a li\t\r")
        pipe.send_text("\x04")  # Ctrl-D ends the session
        typed = interactive(completer, k=3, input=pipe, output=DummyOutput())
    assert typed == "The interpreter reads a li" + first
