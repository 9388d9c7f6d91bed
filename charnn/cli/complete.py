"""``charnn complete``, ``charnn serve`` and ``charnn eval-complete``: the autocomplete engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import CharnnError
from . import main, reports_interruption

MODE = click.Choice(["word", "phrase", "line"])


def _completer(checkpoint, last: bool, device: str, **options):
    from ..completion import Completer
    from ..lm import load_language_model

    model, ck = load_language_model(checkpoint, which="last" if last else "best", device=device)
    return Completer(model, vocab=ck.vocab, device=device, **options), ck


def _suggestion_line(s) -> str:
    return f"{json.dumps(s.text, ensure_ascii=False)}\t{s.probability:.4g}"


@main.command("complete")
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--k", "k", type=click.IntRange(1, 20), default=3, show_default=True, help="Suggestions to show.")
@click.option("--mode", type=MODE, default="word", show_default=True, help="Complete the word, the phrase or the line.")
@click.option("--max-chars", type=click.IntRange(1, 1000), default=32, show_default=True, help="Longest suggestion.")
@click.option("--last", is_flag=True, help="Use the run's last model rather than its best.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, mps or auto.")
@click.option("--json", "as_json", is_flag=True, help="Pipe mode: print one JSON object.")
def complete_cmd(checkpoint, k, mode, max_chars, last, device, as_json):
    """Live suggestions as you type (Tab accepts the first), or suggestions for each line piped in.

    CHECKPOINT defaults to the latest language model. In pipe mode every input
    line is completed and its suggestions print one per line, as a JSON string
    and its probability separated by a tab; with several input lines, each
    line's suggestions follow a "> LINE" header.

    \b
    Examples:
      charnn complete checkpoints/shakespeare
      echo "To be or" | charnn complete --k 3
      echo "To be, or not" | charnn complete --mode line --json
    """
    completer, _ = _completer(checkpoint, last, device)
    if sys.stdin.isatty() and sys.stdout.isatty() and not as_json:
        interactive(completer, k=k, mode=mode, max_chars=max_chars)
        return
    with reports_interruption(as_json, checkpoint=str(checkpoint), mode=mode, k=k):
        # lines end at \n only: str.splitlines would also cut at form feeds, \x1c-\x1e and U+2028
        lines = _read_stdin().replace("\r\n", "\n").split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        if not lines:
            raise CharnnError("no text on standard input; pipe some in, e.g. echo 'To be or' | charnn complete")
        results = [(line, completer.suggest(line, k=k, mode=mode, max_chars=max_chars)) for line in lines]
    if as_json:
        click.echo(json.dumps({"mode": mode, "k": k, "inputs": [
            {"text": line, "suggestions": [s.to_dict() for s in found]} for line, found in results]}, ensure_ascii=False))
        return
    for line, found in results:
        if len(results) > 1:
            click.echo(f"> {line}")
        for s in found:
            click.echo(_suggestion_line(s))


def _read_stdin() -> str:
    """Standard input as UTF-8 text; undecodable bytes are one error line."""
    from ..data import read_stdin

    return read_stdin("utf-8", "convert it first, e.g. iconv -f latin1 -t utf-8 notes.txt | charnn complete")


def interactive(completer, *, k: int = 3, mode: str = "word", max_chars: int = 32, input=None, output=None) -> str:
    """A prompt_toolkit session: the first suggestion shows as grey text, all ``k`` in the toolbar; Tab accepts.

    Each entered line joins the context of the next. Ctrl-D or Ctrl-C ends
    the session; returns everything entered.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.application.current import get_app
    from prompt_toolkit.auto_suggest import AutoSuggest
    from prompt_toolkit.auto_suggest import Suggestion as Ghost
    from prompt_toolkit.key_binding import KeyBindings

    lines: list[str] = []
    memo: dict[str, list] = {}

    def suggestions(before_cursor: str) -> list:
        text = "".join(line + "\n" for line in lines) + before_cursor
        if text not in memo:
            memo.clear()  # only the current text is worth keeping
            memo[text] = completer.suggest(text, k=k, mode=mode, max_chars=max_chars)
        return memo[text]

    class FirstSuggestion(AutoSuggest):
        def get_suggestion(self, buffer, document):
            found = suggestions(document.text_before_cursor)
            return Ghost(found[0].text) if found else None

    keys = KeyBindings()

    @keys.add("tab")
    def _accept(event):
        buffer = event.current_buffer
        found = suggestions(buffer.document.text_before_cursor)
        if found:
            buffer.insert_text(found[0].text)

    def toolbar():
        found = suggestions(get_app().current_buffer.document.text_before_cursor)
        shown = "   ".join(f"{i}) {json.dumps(s.text, ensure_ascii=False)} {s.probability:.0%}" for i, s in enumerate(found, 1))
        return f" {mode}: {shown or '(no suggestion)'}   [Tab accepts 1, Ctrl-D quits]"

    session = PromptSession(auto_suggest=FirstSuggestion(), key_bindings=keys, bottom_toolbar=toolbar,
                            input=input, output=output)
    while True:
        try:
            lines.append(session.prompt("> "))
        except (EOFError, KeyboardInterrupt):
            break
    return "\n".join(lines)


@main.command("serve")
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-text-chars", type=click.IntRange(1), default=20_000, show_default=True, help="Longest input text.")
@click.option("--max-generate-chars", type=click.IntRange(1), default=2_000, show_default=True, help="Longest generation.")
@click.option("--max-generations", type=click.IntRange(1), default=4, show_default=True,
              help="Generations and scorings at once; more get 503 (completions are never refused).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, mps or auto.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info", show_default=True)
def serve_cmd(checkpoint, host, port, max_text_chars, max_generate_chars, max_generations, device, log_level):
    """Serve a model over HTTP: JSON API, OpenAPI schema at /docs and a web page at /.

    Needs the serve extra: pip install 'charnn[serve]'.

    \b
    Examples:
      charnn serve checkpoints/shakespeare
      curl -s localhost:8000/v1/complete -d '{"text": "To be or", "k": 3}' -H 'content-type: application/json'
    """
    from ..lm import load
    from ..serving import LOOPBACK, _require_fastapi, bind_sockets, serve, url

    _require_fastapi()
    # Bound (and listening) before anything is announced or loaded: a taken port is one error line, and no
    # other process can take the port between this check and uvicorn starting.
    sockets = bind_sockets(host, port)
    try:
        if host not in LOOPBACK:
            click.echo(f"warning: listening on {host}: anyone who can reach this machine can use the model", err=True)
        model = load(checkpoint, device=device)
        click.echo(f"serving on {url(sockets, host)} (API docs at /docs); Ctrl-C stops", err=True)
        serve(model, host=host, port=port, log_level=log_level, sockets=sockets, max_text_chars=max_text_chars,
              max_generate_chars=max_generate_chars, max_generations=max_generations)
    finally:
        for sock in sockets:
            sock.close()


@main.command("eval-complete")
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--k", "k", type=click.IntRange(3, 10), default=3, show_default=True, help="Suggestions per keystroke.")
@click.option("--mode", type=MODE, default="word", show_default=True)
@click.option("--max-chars", type=click.IntRange(1, 1000), default=32, show_default=True, help="Longest suggestion.")
@click.option("--limit", type=click.IntRange(2), help="Type only the first N characters of FILE.")
@click.option("--train-text", type=click.Path(), help="Dictionary baseline's text.  [default: the model's training text]")
@click.option("--no-baseline", is_flag=True, help="Skip the dictionary baseline.")
@click.option("--beam-width", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--length-penalty", type=click.FloatRange(0, 2), default=0.5, show_default=True)
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--last", is_flag=True, help="Use the run's last model rather than its best.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def eval_complete_cmd(checkpoint, file, k, mode, max_chars, limit, train_text, no_baseline, beam_width, length_penalty,
                      encoding, last, device, as_json, quiet):
    """Simulate a user typing FILE with the model's suggestions.

    Reports the keystroke savings when the user accepts the first suggestion
    (or any of the top 3) whenever it is what they were about to type, the
    next-character top-1/top-5 accuracy and the latency per keystroke, beside
    a dictionary baseline built from the model's training text (word mode).
    """
    from ..completion_eval import DictionaryCompleter, evaluate_completion, training_text
    from ..data import read_text

    with reports_interruption(as_json, checkpoint=str(checkpoint), file=file):
        completer, ck = _completer(checkpoint, last, device, beam_width=beam_width, length_penalty=length_penalty)
        doc = read_text(Path(file), encoding)[:limit]
        dictionary = None
        if train_text and (no_baseline or mode != "word"):
            raise CharnnError("--train-text feeds the dictionary baseline, which runs only in --mode word and "
                              "without --no-baseline; drop --train-text")
        if not no_baseline and mode == "word":
            source = read_text(Path(train_text), encoding) if train_text else training_text(ck.config)
            dictionary = DictionaryCompleter(source)
        report = {"checkpoint": str(ck.path), "file": file,
                  **evaluate_completion(completer, doc, k=k, mode=mode, max_chars=max_chars, dictionary=dictionary,
                                        progress=not quiet)}
    if as_json:
        click.echo(json.dumps(report))
        return
    _print_report(report)


def _print_report(r: dict) -> None:
    lat, m = r["latency_ms"], r["model"]
    click.echo(f"{r['checkpoint']}: typing {r['chars']:,} characters of {r['file']} ({r['mode']} mode, k={r['k']})")
    rows = [("model", m)] + ([("dictionary", r["dictionary"])] if "dictionary" in r else [])
    click.echo(f"{'':12} {'savings top-1':>14} {'savings top-3':>14}")
    for name, s in rows:
        click.echo(f"{name:12} {s['savings_top1']:13.2f}% {s['savings_top3']:13.2f}%")
    if "dictionary" in r:
        click.echo(f"model - dictionary: {r['savings_top1_gain_points']:+.2f} points (top-1), "
                   f"{r['savings_top3_gain_points']:+.2f} points (top-3)")
    click.echo(f"next character: top-1 {r['next_char_top1']:.2f}%, top-5 {r['next_char_top5']:.2f}%")
    click.echo(f"latency per keystroke: p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms, p99 {lat['p99']:.2f} ms")
