"""The README's "From Python" snippet and docs/python.md's "Use" snippet run as written."""

import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def first_python_block(path, after):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    match = re.search(r"```python\n(.*?)```", text[text.index(after):], re.S)
    return match.group(1)


@pytest.mark.parametrize("path, after", [("README.md", "## From Python"), ("docs/python.md", "## Use")])
def test_snippet_runs(path, after):
    scope = {}
    exec(compile(first_python_block(path, after), path, "exec"), scope)
    assert scope["o"].shape == (2, 1024, 8, 64) and scope["bias"].r1.grad is not None
