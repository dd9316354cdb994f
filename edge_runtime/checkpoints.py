"""The edge's checkpoints and where a run resumes: the engine's state with the run's config.

Why it exists: a device run survives its own crash and the cloud's. A checkpoint holds the
engine's state plus the run's config as JSON, with a SHA-256 of every engine file that is
checked before a restore, and appears atomically (written to a staging dir, fsynced and
renamed). A run resumes at the checkpoint that meets the step the cloud says it has applied,
and when the cloud comes back behind the edge, the edge goes back to its checkpoint of that step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from edge_runtime.batches import TrainBatch
from edge_runtime.engine import EdgeEngine
from splitwire.atomic import publish_directory
from splitwire.bundle import sha256_file
from splitwire.errors import CheckpointCorrupt, SplitftError

RUN_FILE = "run.json"
ENGINE_DIR = "edge"
CHECKPOINT_PREFIX = "step-"


class ResumeError(SplitftError):
    """The checkpoints on the device and the cloud's session cannot be brought to one step."""

    code = "resume"


@dataclass(frozen=True)
class RunConfig:
    """What fixes a run: resuming with anything else would train on another data order or task."""

    session: str
    bundle_hash: str
    data_sha256: str
    columns: dict[str, str | None]
    label_map: dict[str, Any]
    seed: int
    batch_size: int
    epochs: int
    max_steps: int | None
    holdout: float | None
    schedule: dict[str, Any]
    group_by_length: bool = False
    codec: str = "fp32"  # the wire codec (splitwire.codecs): the cloud session is opened with it

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Fields added later (those with defaults) may be absent from an older run's ``run.json``."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING})


def check_same_run(config: RunConfig, saved: RunConfig, where: Path) -> None:
    """Refuse to resume a run with a different config: it would not be the same training."""
    changed = [name for name, value in asdict(config).items() if asdict(saved)[name] != value]
    if changed:
        details = "; ".join(f"{name}: was {asdict(saved)[name]!r}, now {asdict(config)[name]!r}" for name in changed)
        raise ResumeError(f"{where} holds a run with another config ({details}); "
                          "pass the same options, or a fresh checkpoint dir (--checkpoint-dir) to start a new run")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    epoch: int
    config: RunConfig
    files: dict[str, str] | None = None  # engine file -> SHA-256; None in checkpoints of splitft 0.1 and older

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE_DIR

    def verify(self) -> None:
        """``CheckpointCorrupt`` unless the engine files are exactly those that were saved."""
        if self.files is None:
            return
        found = _engine_files(self.engine_dir)
        for name in sorted(set(self.files) | set(found)):
            if self.files.get(name) != found.get(name):
                what = "is missing" if name not in found else "was not saved" if name not in self.files else \
                    "fails its checksum"
                raise CheckpointCorrupt(f"checkpoint {self.path}: {ENGINE_DIR}/{name} {what}; delete that "
                                        "checkpoint directory to resume from an older one", path=str(self.path))


def _engine_files(engine_dir: Path) -> dict[str, str]:
    return {p.relative_to(engine_dir).as_posix(): sha256_file(p) for p in sorted(engine_dir.rglob("*")) if p.is_file()}


class CheckpointDir:
    """``root/step-NNNNNNNN/{edge/, run.json}``, each written to a temp dir, fsynced and renamed into place."""

    def __init__(self, root: str | Path, *, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def all(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        paths = sorted(p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if (p / RUN_FILE).is_file())
        return [self.read(p) for p in paths]

    def latest(self) -> Checkpoint | None:
        found = self.all()
        return found[-1] if found else None

    @staticmethod
    def read(path: Path) -> Checkpoint:
        try:
            state = json.loads((path / RUN_FILE).read_text())
            return Checkpoint(path, int(state["step"]), int(state["epoch"]), RunConfig.from_dict(state["config"]),
                              state.get("files"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{path / RUN_FILE} is damaged ({type(exc).__name__}: {exc}); "
                              "delete that checkpoint directory to resume from an older one") from None

    def save(self, engine: EdgeEngine, *, step: int, epoch: int, config: RunConfig) -> Checkpoint:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{CHECKPOINT_PREFIX}*"):  # staging dirs of a save cut by a crash
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step:08d}-", dir=self.root))
        try:
            (staging / ENGINE_DIR).mkdir()
            engine.save(staging / ENGINE_DIR)
            state = {"step": step, "epoch": epoch, "config": asdict(config),
                     "files": _engine_files(staging / ENGINE_DIR)}
            (staging / RUN_FILE).write_text(json.dumps(state, indent=2) + "\n")
            final = self.root / f"{CHECKPOINT_PREFIX}{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            publish_directory(staging, final)  # a crash leaves the old checkpoint or the new one
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._prune()
        return self.read(final)

    def _prune(self) -> None:
        for old in self.all()[:-self.keep]:
            shutil.rmtree(old.path)


def resume_point(cloud_step: int, saved: list[Checkpoint]) -> Checkpoint | None:
    """The checkpoint to continue from, given the last step the cloud has applied.

    The cloud may be one step ahead (the edge stopped after the cloud applied a step):
    that step is then resent and answered from the cloud's replay cache. ``None`` means
    the bundle's initial weights (step 0).
    """
    for checkpoint in reversed(saved):
        if checkpoint.step in (cloud_step, cloud_step - 1):
            return checkpoint
    if cloud_step in (0, 1):
        if saved and cloud_step == 0:
            raise ResumeError(
                f"the cloud holds no training for this session, but {saved[-1].path} is at step {saved[-1].step}: "
                "pass the session that run used, or a fresh --checkpoint-dir to start over"
            )
        return None
    have = ", ".join(str(c.step) for c in saved) or "none"
    raise ResumeError(
        f"the cloud's session is at step {cloud_step}, but the edge checkpoints are at steps {have}: "
        "the two halves cannot continue from the same step; start a new session with a fresh --checkpoint-dir"
    )


def restore_checkpoint(engine: EdgeEngine, checkpoint: Checkpoint | None) -> int:
    """Load ``checkpoint`` into ``engine`` (``None``: keep the bundle's initial weights); its step."""
    if checkpoint is None:
        return 0
    checkpoint.verify()
    engine.restore(checkpoint.engine_dir)
    return checkpoint.step


Rewind = Callable[[int], tuple[int, Iterable[TrainBatch]]]


def rewind_to_checkpoint(engine: EdgeEngine, directory: CheckpointDir,
                         batches_after: Callable[[int], Iterable["TrainBatch"]]) -> Rewind:
    """What ``train`` calls when the cloud came back at an older step: restore the edge's
    checkpoint that meets it (``resume_point``) and continue with the batches after it."""
    def rewind(cloud_step: int) -> tuple[int, Iterable[TrainBatch]]:
        step = restore_checkpoint(engine, resume_point(cloud_step, directory.all()))
        return step, batches_after(step)
    return rewind
