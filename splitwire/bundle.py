"""The bundle: a directory with ``manifest.json`` naming every file and its SHA-256.

Why it exists: edge and cloud load the same bundle in different processes (the edge
without torch), and must agree on it. This module reads and verifies a bundle with the
standard library alone (what the manifest must hold is ``splitwire.manifest``);
``sft-export`` writes it. The *bundle hash* (SHA-256 of the manifest bytes, which include
every file's hash) is what the two sides compare at connect time.

Layout::

    manifest.json
    edge/tokenizer.json       edge/<engine files>     (by role in the manifest's edge.files)
    cloud/weights.safetensors
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from splitwire.errors import BundleError
from splitwire.manifest import MANIFEST, Manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    hash: str  # SHA-256 of manifest.json's bytes

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    @property
    def split(self) -> dict[str, Any]:
        return self.manifest.split

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest.encoder

    @property
    def wire_width(self) -> int:
        """Last dimension of ``z``: the rank, or ``hidden`` for a vanilla split."""
        rank = self.split["rank"]
        return int(rank if rank is not None else self.encoder["hidden_size"])

    @property
    def label_private(self) -> bool:
        """The U-shaped split: the device holds the pooling layer, classifier and loss."""
        return self.manifest.label_private

    @property
    def pooled_width(self) -> int | None:
        """Width of the pooled top output the cloud sends down in the label-private split (hidden), else None."""
        return int(self.encoder["hidden_size"]) if self.label_private else None

    @property
    def num_labels(self) -> int:
        return int(self.split["num_labels"])

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    def edge_file(self, role: str) -> Path:
        """Path of one of the edge engine's files, by its role (``splitwire.manifest``: e.g. ``TRAINING_MODEL``)."""
        try:
            return self.path(self.manifest.edge.files[role])
        except KeyError:
            raise BundleError(f"bundle {self.root} has no edge file for role {role!r}") from None

    def cloud_file(self, role: str) -> Path:
        """Path of one of the cloud half's files, by its role (``WEIGHTS``)."""
        try:
            return self.path(self.manifest.cloud.files[role])
        except KeyError:
            raise BundleError(f"bundle {self.root} has no cloud file for role {role!r}") from None


def load_bundle(root: str | Path, *, parts: Iterable[str] = ("edge", "cloud")) -> Bundle:
    """Read ``root/manifest.json``, check it (``Manifest.parse``) and verify the hash of every file under ``parts``.

    A device verifies only ``edge/`` (it need not hold ``cloud/``), the server only
    ``cloud/``. Raises ``BundleError`` with a message that says what is wrong.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    raw = manifest_path.read_bytes()
    try:
        manifest = Manifest.parse(json.loads(raw), manifest_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    prefixes = tuple(f"{p}/" for p in parts)
    for relpath, expected in manifest.files.items():
        if not relpath.startswith(prefixes):
            continue
        path = _inside(root, relpath)
        if not path.is_file():
            raise BundleError(f"bundle file {relpath} is missing from {root}")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"bundle file {relpath} does not match the manifest (sha256 {actual[:12]}… != {expected[:12]}…): "
                "it was modified or corrupted; re-export the bundle or copy it again"
            )
    return Bundle(root, manifest, hashlib.sha256(raw).hexdigest())


def _inside(root: Path, relpath: str) -> Path:
    path = (root / relpath).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"manifest names a file outside the bundle: {relpath!r}")
    return path
