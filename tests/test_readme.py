"""README's two quick-start commands stay true: CI runs exactly the test command it shows."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_readme_commands():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick)
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    demo, tests = commands
    assert "g3n demo" in demo
    assert tests in ci and demo in ci


def test_readme_python_example_runs():
    """The README's Python example runs as written (its imports are the public API)."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("### From Python", 1)[1]
    code = re.findall(r"```python\n(.+?)\n```", example, re.DOTALL)[0]
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: None})  # noqa: S102 - the README's own code
