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


def test_the_api_example_trains_against_a_real_cloud_and_resumes(tmp_path_factory, tiny_model_dir, tmp_path):
    """docs/API.md's example, run twice as written (its bundle, cloud URL and checkpoint dir
    pointed at this test's) in a process where torch cannot be imported, against a real
    ``sft-cloud``: the first run trains its 4 steps with callbacks and checkpoints, evaluates and
    predicts; the second resumes at step 4 and trains nothing."""
    import subprocess
    import sys

    from bundles import export_cached, tiny_options
    from cloud_harness import CloudProcess
    from test_edge_trainer import NO_TORCH

    bundle = export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"))
    (code,) = _python_blocks(DOCS / "API.md")
    cloud = CloudProcess(bundle, tmp_path / "state", log_path=tmp_path / "cloud.log").start()
    try:
        for name, value in (("BUNDLE", bundle), ("CLOUD", cloud.url), ("CHECKPOINTS", tmp_path / "runs")):
            code, count = re.subn(rf'^{name} = ".*?"', f"{name} = {str(value)!r}", code, flags=re.M)
            assert count == 1, name
        script = tmp_path / "example.py"
        script.write_text(NO_TORCH.split("from edge_runtime.cli")[0] + code)
        runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                               cwd=DOCS.parent) for _ in range(2)]
    finally:
        cloud.stop()
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = runs[0].stdout, runs[1].stdout
    assert re.findall(r"^step (\d)/4: loss \d+\.\d+, \d+ bytes up$", first, flags=re.M) == ["1", "2", "3", "4"]
    assert re.findall(r"^checkpoint of step (\d)", first, flags=re.M) == ["0", "2", "4"]
    assert "trained 4 steps; the run is at step 4" in first and "'accuracy'" in first and "logits: [[" in first
    assert "trained 0 steps; the run is at step 4" in second and "step 1/4" not in second
    assert cloud.events().count("train") == 4
