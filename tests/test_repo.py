"""The repository's promises: CI runs exactly the README's test command."""

import re
from pathlib import Path

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
