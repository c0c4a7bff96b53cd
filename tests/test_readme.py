"""Every Python snippet of the README and docs runs as written (issue 26).

A reader copies a snippet into a file and runs it from the checkout; one that needs names it never
defines (``np``, ``image``, ``x``) fails on the first try. Each ```` ```python ```` block is run
as-is, in a fresh interpreter with the repository root as working directory. A block that cannot
run here (it needs downloaded weights or data) is fenced ```` ```python no-test ```` and skipped,
saying so; there is none at present. Shell blocks are not run.
"""

import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def python_blocks():
    """(id "file:line", fence options, code) of every python block in :data:`DOCUMENTS`."""
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(
                (
                    f"{document.relative_to(REPO_ROOT)}:{line}",
                    match.group(1).split(),
                    match.group(2),
                )
            )
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_snippets():
    """Guards the test below against passing on nothing (a renamed fence, a moved README)."""
    assert any(name.startswith("README.md:") for name, _, _ in BLOCKS)


@pytest.mark.parametrize("name,options,code", BLOCKS, ids=[name for name, _, _ in BLOCKS])
def test_snippet_runs_as_written(name, options, code):
    if "no-test" in options:
        pytest.skip(
            f"{name} is fenced 'python no-test': it needs files this checkout does not have"
        )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
