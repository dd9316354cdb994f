"""The Python examples in the docs run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["USAGE.md"])
def test_python_examples_run(doc, capsys):
    blocks = _python_blocks(DOCS / doc)
    assert blocks, f"{doc} has no python example"
    for code in blocks:
        exec(compile(code, str(DOCS / doc), "exec"), {})
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert re.search(r"z of shape \(2, \d+, 8\)", out)
