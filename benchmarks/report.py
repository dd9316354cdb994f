"""One place for how a benchmark records its result, and for assembling docs/BENCHMARKS.md.

Why it exists: every number in the docs must come from a command anyone can rerun, printed
with the machine and settings. Each benchmark module calls ``write_section(name, ...)``,
which stores ``docs/bench/<name>.md`` (the prose + table, with the settings and machine) and
``docs/bench/<name>.json`` (the raw numbers); ``python -m benchmarks.report`` joins the
sections, in ``ORDER``, into ``docs/BENCHMARKS.md``. Plots go next to them as
``docs/bench/<name>*.png``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "docs" / "bench"
ORDER = ("traffic", "edge_engines", "edge_gemm", "edge_budget", "link_speed", "load", "soak", "accuracy")
PACKAGES = ("torch", "onnxruntime-training-cpu", "onnxruntime", "numpy", "transformers", "websockets")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions, "git": _git_head(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_line(info: dict[str, Any]) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    return f"*Measured {info['date']} on {info['cpu']} ({info['cores']} cores), Python {info['python']}, {pkgs}; commit {info['git']}.*"


def save_plot(fig, name: str, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``docs/bench/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_section(name: str, *, title: str, command: str, settings: dict[str, Any], body: str,
                  results: Any) -> Path:
    """Store one benchmark's section (markdown) and raw results (JSON) under docs/bench/."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    info = machine()
    settings_line = ", ".join(f"{k}={v}" for k, v in settings.items())
    text = f"## {title}\n\n`{command}`\n\n{machine_line(info)}\n\nSettings: {settings_line}.\n\n{body.strip()}\n"
    (BENCH_DIR / f"{name}.json").write_text(json.dumps({"machine": info, "settings": settings, "results": results},
                                                       indent=1, default=str))
    path = BENCH_DIR / f"{name}.md"
    path.write_text(text)
    print(text)
    return path


def assemble() -> Path:
    parts = ["# Benchmarks\n\nEvery section below is written by `make bench` (or the command it names); "
             "rerun it to regenerate the numbers and plots. Timings are ratios measured in the same run.\n"]
    names = [n for n in ORDER if (BENCH_DIR / f"{n}.md").exists()]
    names += sorted(p.stem for p in BENCH_DIR.glob("*.md") if p.stem not in ORDER)
    # A section links its plots as "name.png" (beside it in docs/bench/); from docs/ they are "bench/name.png".
    parts += [re.sub(r"\]\(([\w.-]+\.png)\)", r"](bench/\1)", (BENCH_DIR / f"{n}.md").read_text()) for n in names]
    out = ROOT / "docs" / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    return out


if __name__ == "__main__":
    print(f"wrote {assemble()}")
