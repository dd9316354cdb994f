"""Write a bundle directory all at once or not at all.

Why it exists: a bundle is only usable when every file matches the manifest's hashes, so
``sft-export`` stages it in a hidden directory next to the target, hashes every file into
``manifest.json`` and renames the directory into place as the last step. A failed export
leaves nothing half-written, and an existing bundle is replaced only when asked to.
The layout and manifest keys are those ``splitwire.bundle`` reads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import save_file

from splitwire.atomic import publish_directory
from splitwire.bundle import sha256_file
from splitwire.errors import SplitftError
from splitwire.manifest import FORMAT, FORMAT_VERSION, MANIFEST, Manifest


class ExportError(SplitftError):
    """The export cannot proceed as asked (bad arguments, an existing bundle, no tokenizer…)."""

    code = "export"


def check_target(out: Path, *, force: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``force``; called before any slow work."""
    if out.is_file() or out.is_symlink():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it")


@contextmanager
def staged_bundle(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes ``out`` (replacing it under ``force``)."""
    out = Path(out).absolute()
    check_target(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        check_target(out, force=force)  # nothing appeared there meanwhile
        _make_readable(staging)
        _replace(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """Staging directories and safetensors files are created private; a bundle is meant to be copied and shared."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _replace(out: Path, staging: Path) -> None:
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(retired / out.name)
        publish_directory(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        publish_directory(staging, out)


def save_numpy_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """A safetensors file of float32 arrays, readable with numpy alone (no torch on the edge)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: np.ascontiguousarray(a, dtype=np.float32) for name, a in weights.items()}, str(path))


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under ``root`` into ``manifest["files"]`` and write ``manifest.json``."""
    files = {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    Manifest.parse(manifest, root / MANIFEST)  # what the readers will accept, or a BundleError now
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
