"""The web page's own JavaScript, run with node (no browser needed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import charnn


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's JavaScript")
def test_the_page_never_cuts_an_emoji_in_half():
    """The page cut long texts in UTF-16 units, so a cut could start on the second half of an emoji's surrogate pair;
    the server rejected that text (HTTP 422) and the page showed no suggestions."""
    page = (Path(charnn.__file__).parent / "web" / "index.html").read_text(encoding="utf-8")
    function = re.search(r"function fromWhole\(text, start\) \{.*?\n\}", page, re.S).group(0)
    script = function + r"""
const text = "a" + "\u{1F389}".repeat(3);               // a, then three emoji of two UTF-16 units each
console.log(JSON.stringify([fromWhole(text, 2), fromWhole(text, 1), fromWhole(text, 0), fromWhole("abc", 1)]));
"""
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(out) == ["\U0001F389\U0001F389", "\U0001F389" * 3, "a" + "\U0001F389" * 3, "bc"]
