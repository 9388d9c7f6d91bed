"""The repository's promises: CI runs exactly the README's test command; the benchmark scripts' errors are one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .*?)\n```", (REPO / "README.md").read_text(encoding="utf-8"))


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()[:2]
    assert "pytest" in tests and "charnn train" in main_job and "charnn sample" in main_job
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci
    assert ci.index("pip install -q torch==2.13.0") < ci.index(tests)


def test_torch_requirement_admits_the_local_cpu_build():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    spec = re.search(r'"torch([^"]*)"', text).group(1)
    assert spec.startswith(">=2.") and "<3" in spec, spec


def test_readme_glob_examples_reach_subfolders(tmp_path):
    """Every `charnn train DIR --glob 'PATTERN'` in the README's examples reads the matching files at any depth,
    as a corpus folder's subfolders are part of the corpus (pathlib's `*.md` would skip notes/sub/b.md)."""
    from charnn.data import resolve_files

    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    patterns = [m for block in blocks for line in block.splitlines() if "charnn train" in line
                for m in re.findall(r"--glob '([^']+)'", line)]
    assert patterns, "the README no longer shows --glob"
    for i, pattern in enumerate(patterns):
        root = tmp_path / str(i)
        name = pattern.rsplit("/", 1)[-1].replace("*", "b")
        top, nested = root / name, root / "sub" / "deeper" / name
        for f in (top, nested, root / "sub" / "other.bin"):
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("x", encoding="utf-8")
        assert resolve_files([root], pattern) == [top, nested], pattern


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")))
def test_benchmark_scripts_refuse_a_bad_option_in_one_line(script):
    """Every benchmark's argument mistakes print one ``error:`` line (no usage block) and exit 2."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--no-such-option"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: unrecognized arguments: --no-such-option (see '{script} --help')\n"
