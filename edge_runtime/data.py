"""The user's local training text: CSV, TSV or JSONL rows → texts, sentence pairs and label ids.

Why it exists: the private data never leaves the device, so reading it is the edge's job.
A run fixes its *label map* (file labels → the head's output ids) once, from the training
file, and stores it with its checkpoints so that ``eval`` and ``predict`` use the same
ids. Every error names the file, the line and the column, so a user can fix the file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from splitwire.errors import UsageError

FORMATS = ("csv", "tsv", "jsonl")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class DataError(UsageError):
    """A data file is missing, empty or malformed, or a row does not fit the run."""

    code = "data"


@dataclass(frozen=True)
class Table:
    """Rows of one file as ``(line number, {column: value})``, with the file's column names."""

    path: Path
    columns: tuple[str, ...]
    rows: list[tuple[int, dict[str, Any]]]

    def where(self, line: int, column: str) -> str:
        return f"{self.path}:{line}: column {column!r}"


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the optional second text of a pair, and the label."""

    text: str
    pair: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class TextData:
    """Texts (and pairs) in file order; ``labels`` are int64 class ids or float32 targets."""

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TextData":
        idx = [int(i) for i in indices]
        return TextData(
            texts=[self.texts[i] for i in idx],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
        )


def detect_format(path: Path) -> str:
    """From the suffix; otherwise JSONL if the first line is an object, TSV if it has a tab, else CSV."""
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in first else "csv"


def read_table(path: str | Path, *, fmt: str | None = None) -> Table:
    """Read a CSV/TSV file with a header row, or a JSONL file of objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        table = _read_jsonl(path) if fmt == "jsonl" else _read_delimited(path, fmt)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not table.rows:
        raise DataError(f"{path}: the file has no data rows")
    return table


def _read_delimited(path: Path, fmt: str) -> Table:
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt == "tsv":  # TSV as GLUE writes it: no quoting, a quote is an ordinary character
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty")
            header = [name.strip() for name in header]
            _check_header(path, header)
            rows = []
            start = reader.line_num + 1  # where the next record begins: a quoted field may span lines
            for fields in reader:
                if fields and len(fields) != len(header):
                    spans = reader.line_num > start
                    raise DataError(
                        f"{path}:{start}: {len(fields)} fields, but the header has {len(header)} "
                        f"({', '.join(header)}); "
                        + (f"a quote opened on line {start} is not closed before line {reader.line_num}"
                           if spans else f"is the file {fmt.upper()}?")
                    )
                if fields:  # else a blank line
                    rows.append((start, dict(zip(header, fields))))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{path}:{start}: malformed {fmt.upper()}: {exc}") from None
    return Table(path, tuple(header), rows)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _check_header(path: Path, header: list[str]) -> None:
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}:1: the header repeats column(s) {', '.join(duplicated)}")
    if not any(header):
        raise DataError(f"{path}:1: the header row is empty")


def _read_jsonl(path: Path) -> Table:
    rows: list[tuple[int, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: malformed JSON: {exc.msg} at column {exc.colno}") from None
            except ValueError as exc:  # NaN or Infinity, which Python's json would otherwise accept
                raise DataError(f"{path}:{line_no}: malformed JSON: {exc}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            columns.update(dict.fromkeys(record))
            rows.append((line_no, record))
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return Table(path, tuple(columns), rows)


def _require_column(table: Table, column: str, role: str) -> None:
    if column not in table.columns:
        raise DataError(
            f"{table.path}: no column {column!r} (the {role} column); "
            f"the file has: {', '.join(table.columns) or 'no columns'}"
        )


def _cell(table: Table, line: int, row: dict[str, Any], column: str) -> Any:
    value = row.get(column)
    if value is None:
        raise DataError(f"{table.where(line, column)}: the value is missing")
    return value


def _text_cell(table: Table, line: int, row: dict[str, Any], column: str) -> str:
    value = _cell(table, line, row, column)
    if not isinstance(value, str):
        raise DataError(f"{table.where(line, column)}: expected text, got {type(value).__name__} {value!r}")
    return value


def _label_key(value: Any) -> str:
    """The label as the label map names it: ints and integral floats as digits, text stripped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _as_number(table: Table, line: int, column: str, value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{table.where(line, column)}: expected a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class LabelMap:
    """How the file's labels become the head's targets, fixed once per run.

    ``classification``: ``names[i]`` is the file label of class id ``i``; with ``threshold``
    set, a numeric column becomes class ``1`` when ``value > threshold`` and ``0`` otherwise.
    ``regression`` (one output): the label is the float target itself.
    """

    task: str
    names: tuple[str, ...] = ()
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.task not in ("classification", "regression"):
            raise UsageError(f"unknown task {self.task!r}")
        if self.task == "classification" and len(self.names) < 2:
            raise UsageError("classification needs at least two label names")

    @property
    def num_labels(self) -> int:
        return 1 if self.task == "regression" else len(self.names)

    def target(self, table: Table, line: int, value: Any, column: str) -> int | float:
        """The class id or regression target of one cell."""
        if self.task == "regression":
            return _as_number(table, line, column, value)
        if self.threshold is not None:
            return int(_as_number(table, line, column, value) > self.threshold)
        key = _label_key(value)
        if key not in self.names:
            raise DataError(
                f"{table.where(line, column)}: unknown label {key!r}; this run's labels are {', '.join(self.names)}"
            )
        return self.names.index(key)

    def name(self, class_id: int) -> str:
        return self.names[class_id]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "names": list(self.names), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelMap":
        threshold = data.get("threshold")
        return cls(str(data["task"]), tuple(str(n) for n in data["names"]),
                   None if threshold is None else float(threshold))


def infer_label_map(
    table: Table,
    *,
    column: str,
    num_labels: int,
    threshold: float | None = None,
    names: Sequence[str] | None = None,
) -> LabelMap:
    """The label map for a training file and a head with ``num_labels`` outputs.

    Without ``names``: integer labels that all lie in ``0..num_labels-1`` keep their
    value as id; otherwise the distinct labels, sorted (numerically if all are integers),
    take ids ``0, 1, …`` and must be exactly ``num_labels``.
    """
    _require_column(table, column, "label")
    if num_labels == 1:
        if threshold is not None or names:
            raise DataError("the bundle's head is a regression (1 output): --label-threshold and --labels do not apply")
        return LabelMap("regression")
    if threshold is not None:
        if num_labels != 2 or names:
            raise DataError(f"--label-threshold makes a binary label, but the bundle's head has {num_labels} outputs")
        return LabelMap("classification", ("0", "1"), float(threshold))
    if names:
        if len(names) != num_labels:
            raise DataError(f"--labels names {len(names)} labels, but the bundle's head has {num_labels} outputs")
        return LabelMap("classification", tuple(_label_key(n) for n in names))
    return LabelMap("classification", _distinct_labels(table, column, num_labels))


def _distinct_labels(table: Table, column: str, num_labels: int) -> tuple[str, ...]:
    found: dict[str, int] = {}
    for line, row in table.rows:
        key = _label_key(_cell(table, line, row, column))
        if not key:
            raise DataError(f"{table.where(line, column)}: the label is empty")
        found.setdefault(key, line)
    if all(_is_int(k) for k in found):
        ordered = sorted(found, key=int)
        if all(0 <= int(k) < num_labels for k in found):
            return tuple(str(i) for i in range(num_labels))
    else:
        ordered = sorted(found)
    if len(ordered) != num_labels:
        shown = ", ".join(ordered[:10]) + (" …" if len(ordered) > 10 else "")
        raise DataError(
            f"{table.path}: column {column!r} has {len(ordered)} distinct labels ({shown}), but the bundle's "
            f"head has {num_labels} outputs; name the labels in order with --labels, or export with "
            f"--num-labels {len(ordered)}"
        )
    return tuple(ordered)


def _is_int(key: str) -> bool:
    try:
        int(key)
    except ValueError:
        return False
    return True


def table_texts(table: Table, columns: Columns, label_map: LabelMap | None = None) -> TextData:
    """Texts, pairs and (when ``label_map`` is given) targets of every row."""
    _require_column(table, columns.text, "text")
    if columns.pair is not None:
        _require_column(table, columns.pair, "text-pair")
    if label_map is not None:
        if columns.label is None:
            raise DataError("a label column is needed (--label-column)")
        _require_column(table, columns.label, "label")
    texts, pairs, targets = [], [], []
    for line, row in table.rows:
        texts.append(_text_cell(table, line, row, columns.text))
        if columns.pair is not None:
            pairs.append(_text_cell(table, line, row, columns.pair))
        if label_map is not None:
            targets.append(label_map.target(table, line, _cell(table, line, row, columns.label), columns.label))
    labels = None
    if label_map is not None:
        labels = np.asarray(targets, dtype=np.float32 if label_map.task == "regression" else np.int64)
    return TextData(texts, pairs if columns.pair is not None else None, labels)


def holdout_split(n: int, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-seed split of ``range(n)`` into (train, test) indices, each in ascending order."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    n_test = int(round(n * fraction))
    if not 0 < n_test < n:
        raise DataError(f"holding out {fraction:.0%} of {n} rows leaves an empty train or test set")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def output_format(path: str | Path) -> str:
    """``csv`` or ``jsonl`` from the suffix of an output file (checked before any work is done)."""
    path = Path(path)
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt not in ("csv", "jsonl"):
        raise DataError(f"{path}: write predictions to a .csv or .jsonl file")
    if not path.parent.is_dir():
        raise DataError(f"{path}: the directory {path.parent} does not exist")
    return fmt


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]], *, columns: Sequence[str]) -> None:
    """Write rows as JSONL (``.jsonl``/``.ndjson``) or CSV (``.csv``)."""
    path = Path(path)
    fmt = output_format(path)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for row in rows:
                f.write(json.dumps({c: row[c] for c in columns}, ensure_ascii=False) + "\n")
            return
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
