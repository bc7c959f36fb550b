"""The worked examples in docs/architecture.md (add an extension, a task, a model family) run here
against a tiny random model, so the document stays true."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    return dict(EXAMPLE.findall(DOC.read_text()))


def test_the_document_has_the_three_examples():
    assert set(examples()) == {"extension", "task", "family"}


@pytest.mark.parametrize("name", ["extension", "task", "family"])
def test_example_runs(name, base_pipe):
    exec(compile(examples()[name], f"{DOC.name}:{name}", "exec"), {"pipe": base_pipe})
