"""The bundle: a directory with ``manifest.json`` naming every file and its SHA-256.

Why it exists: edge and cloud load the same bundle in different processes (the edge
without torch), and must agree on it. This module reads and verifies a bundle with the
standard library alone; ``sft-export`` writes it. The *bundle hash* (SHA-256 of the
manifest bytes, which include every file's hash) is what the two sides compare at
connect time.

Layout::

    manifest.json
    edge/tokenizer.json       edge/<engine files>     (named in manifest["edge"]["files"])
    cloud/weights.safetensors
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from splitwire.errors import SplitftError

FORMAT = "splitft-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENGINES = ("ort-training", "onnx")
REQUIRED_KEYS = ("format", "format_version", "base_model", "encoder", "split", "max_length", "engine",
                 "edge", "cloud", "optimizer", "tokenizer", "files")


class BundleError(SplitftError):
    """The bundle is missing, incomplete, tampered with, or of another format."""

    code = "bundle"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    hash: str  # SHA-256 of manifest.json's bytes

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    @property
    def split(self) -> dict[str, Any]:
        return self.manifest["split"]

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def wire_width(self) -> int:
        """Last dimension of ``z``: the rank, or ``hidden`` for a vanilla split."""
        rank = self.split["rank"]
        return int(rank if rank is not None else self.encoder["hidden_size"])

    @property
    def num_labels(self) -> int:
        return int(self.split["num_labels"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def edge_file(self, role: str) -> Path:
        """Path of one of the edge engine's files, by its role (e.g. ``training_model``)."""
        try:
            return self.path(self.manifest["edge"]["files"][role])
        except KeyError:
            raise BundleError(f"bundle {self.root} has no edge file for role {role!r}") from None


def load_bundle(root: str | Path, *, parts: Iterable[str] = ("edge", "cloud")) -> Bundle:
    """Read ``root/manifest.json`` and verify the hash of every file under ``parts``.

    A device verifies only ``edge/`` (it need not hold ``cloud/``), the server only
    ``cloud/``. Raises ``BundleError`` with a message that says what is wrong.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    _check_manifest(manifest, manifest_path)
    prefixes = tuple(f"{p}/" for p in parts)
    for relpath, expected in manifest["files"].items():
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


def _check_manifest(manifest: Any, where: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is not a splitft bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{where} has bundle format version {manifest.get('format_version')!r}; "
            f"this splitft reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where} lacks {', '.join(missing)}")
    if manifest["engine"] not in ENGINES:
        raise BundleError(f"{where} names unknown edge engine {manifest['engine']!r}; known: {', '.join(ENGINES)}")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise BundleError(f"{where} lists no files")
    _check_shapes(manifest, where)
    _check_named_files(manifest, where)


def _check_shapes(manifest: dict[str, Any], where: Path) -> None:
    """The fields every reader takes on trust: present, of the right type, in range."""
    def whole(section: str, key: str, *, optional: bool = False) -> None:
        value = manifest[section].get(key) if isinstance(manifest[section], dict) else None
        if optional and value is None and key in manifest[section]:
            return
        if type(value) is not int or value < 1:
            raise BundleError(f"{where}: {section}.{key} must be a whole number >= 1"
                              f"{' or null' if optional else ''}, got {str(value)[:40]!r}")

    for section in ("encoder", "split", "edge", "cloud", "optimizer", "tokenizer"):
        if not isinstance(manifest[section], dict):
            raise BundleError(f"{where}: {section} must be an object")
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size"):
        whole("encoder", key)
    whole("split", "split")
    whole("split", "rank", optional=True)
    whole("split", "num_labels")
    if type(manifest["max_length"]) is not int or manifest["max_length"] < 1:
        raise BundleError(f"{where}: max_length must be a whole number >= 1")


def _check_named_files(manifest: dict[str, Any], where: Path) -> None:
    """Every file the manifest names for a part is in its hash table, under that part's folder:
    nothing is ever loaded unverified."""
    named = [("edge", manifest["tokenizer"].get("file"))]
    for part in ("edge", "cloud"):
        files = manifest[part].get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{where}: {part}.files must map roles to files")
        named += [(part, relpath) for relpath in files.values()]
    for part, relpath in named:
        if not isinstance(relpath, str) or not relpath.startswith(f"{part}/") or relpath not in manifest["files"]:
            raise BundleError(f"{where} names {part} file {str(relpath)[:100]!r}, which is not under {part}/ in its "
                              "hash table: every file a bundle uses must be listed with its SHA-256")
