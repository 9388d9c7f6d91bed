"""``charnn corpus``: list the corpus catalogue and build corpora into files.

A thin layer over :mod:`charnn.corpora`, which holds all the logic.
"""

from __future__ import annotations

import json

import click

from . import CharnnGroup, main


@main.group("corpus", cls=CharnnGroup)
def corpus():
    """List and build ready-made training corpora.

    Builtin corpora are made offline from your Python install; download
    corpora are fetched once, checked against a SHA-256, and cached.
    """


def _size(n: int | None) -> str:
    if n is None:
        return "varies"
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M chars"
    if n >= 1_000:
        return f"{n / 1_000:.0f}k chars"
    return f"{n} chars"


@corpus.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def list_cmd(as_json: bool):
    """Show the corpora that `charnn corpus build` knows."""
    from ..corpora import list_corpora

    entries = list_corpora()
    if as_json:
        click.echo(json.dumps({"corpora": [e.to_dict() for e in entries]}, indent=2))
        return
    rows = [("NAME", "KIND", "SIZE", "DESCRIPTION")]
    rows += [(e.name, e.kind, _size(e.size_chars), e.description) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])


@corpus.command("build")
@click.argument("name")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="File to write the corpus to (UTF-8 text).")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--max-chars", type=click.IntRange(min=1), default=None,
              help="Keep at most this many characters.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def build_cmd(name: str, output: str, force: bool, max_chars: int | None, as_json: bool):
    """Build corpus NAME into the file given by --output.

    See `charnn corpus list` for the names.
    """
    from ..corpora import OutputExistsError, build_corpus, text_stats
    from ..errors import CharnnError

    if output == "-":  # the usual "standard output" spelling would have made a file named "-"
        raise CharnnError("--output - (standard output) is not supported: a corpus is written atomically to a file; "
                          "give a file name, e.g. -o corpus.txt")
    try:
        path = build_corpus(name, output, progress=not as_json, max_chars=max_chars, overwrite=force)
    except OutputExistsError as e:  # the library names its argument, overwrite=True; here it is --force
        raise CharnnError(f"{e.path} already exists; pass --force to replace it") from None
    stats = text_stats(path)
    if as_json:
        click.echo(json.dumps({"corpus": name, "path": str(path), "chars": stats["chars"],
                               "distinct": stats["distinct"]}))
        return
    click.echo(
        f"wrote {path}: {stats['chars']:,} chars, {stats['distinct']} distinct "
        f"(corpus {name})",
        err=True,
    )
