"""Reading raw rows: local JSONL / JSON / CSV / Parquet files, a folder of them, or a `datasets`
hub name. Every row keeps where it came from (`file:line`, `file:row N`, `hub[split]:row N`), so a
bad row is reported at its place, in one line."""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import sha256_file

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Rows:
    """Raw rows of one split, each with its location, and the content hashes of what was read."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: Rows) -> None:
        self.rows += other.rows
        self.where += other.where
        self.sources += other.sources


def _decode(raw: bytes, path: Path, lineno: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = f"{path}:{lineno}" if lineno else str(path)
        raise PipelineError(
            f"{at}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "re-encode the file as UTF-8"
        ) from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PipelineError(
            f"{where}: expected a JSON object (a record), got {type(value).__name__}"
        )
    return value


def read_jsonl(path: Path) -> Rows:
    out = Rows()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise PipelineError(
                    f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
                    "expected one JSON object per line"
                ) from None
            out.rows.append(_object(value, where))
            out.where.append(where)
    return out


def read_json(path: Path) -> Rows:
    text = _decode(path.read_bytes(), path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); "
            "expected a JSON array of objects"
        ) from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}: one wrapping key
    if not isinstance(value, list):
        raise PipelineError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    out = Rows()
    for i, item in enumerate(value):
        where = f"{path}:item {i}"
        out.rows.append(_object(item, where))
        out.where.append(where)
    return out


def read_csv(path: Path) -> Rows:
    text = _decode(path.read_bytes(), path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    out = Rows()
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise PipelineError(f"{where}: more fields than the header's {reader.fieldnames}")
            out.rows.append({k: ("" if v is None else v) for k, v in row.items()})
            out.where.append(where)
    except csv.Error as e:
        raise PipelineError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return out


def read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise PipelineError(f"{path}: not a readable Parquet file ({e})") from None
    out = Rows(rows=table.to_pylist())
    out.where = [f"{path}:row {i}" for i in range(len(out.rows))]
    return out


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_file(path: str | Path) -> Rows:
    """All rows of one file, typed by its suffix, with its sha256 recorded.

    Raises:
        PipelineError: file not found, unknown file type, empty file, or a malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PipelineError(
            f"{path}: unknown file type '{path.suffix}'; expected one of {', '.join(SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: empty file")
    out = reader(path)
    if not out.rows:
        raise PipelineError(f"{path}: no records (only blank lines)")
    out.sources = [{"path": str(path), "sha256": sha256_file(path), "rows": len(out.rows)}]
    return out


def local_files(path: str | Path, pattern: str | None = None) -> list[Path]:
    """The data files a local `path` names: itself, or the files (matching `pattern`) below it."""
    path = Path(path)
    if path.is_file() and pattern is None:
        return [path]
    if not path.is_dir():
        raise PipelineError(f"{path}: file not found")
    if pattern is not None:
        files = sorted(Path(p) for p in glob.glob(str(path / pattern), recursive=True))
        if not files:
            raise PipelineError(f"{path}: no file matches '{pattern}'")
        return files
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise PipelineError(f"{path}: no data files in the folder (expected {', '.join(SUFFIXES)})")
    return files


def read_local(path: str | Path, pattern: str | None = None) -> Rows:
    out = Rows()
    for file in local_files(path, pattern):
        out.extend(read_file(file))
    return out


def read_hub(name: str, config: str | None, split: str, revision: str | None) -> Rows:
    """One split of a `datasets` hub dataset, from its local cache when offline.

    `name` may also be a local folder `datasets` can load; no dataset scripts are run.
    """
    import datasets

    what = (
        f"hub dataset '{name}'" + (f" (config '{config}')" if config else "") + f" split '{split}'"
    )
    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except (ConnectionError, FileNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PipelineError(
            f"{what}: not reachable and not in the local cache ({reason}); "
            "connect once to cache it, or save it to a local file and use data.source=local"
        ) from None
    except ValueError as e:  # unknown split / config
        raise PipelineError(f"{what}: {str(e).splitlines()[0]}") from None
    rows = ds.to_list()
    where = [f"{name}[{split}]:row {i}" for i in range(len(rows))]
    if not rows:
        raise PipelineError(f"{what}: no records")
    source = {"hub": name, "config": config, "split": split, "fingerprint": ds._fingerprint}
    return Rows(rows=rows, where=where, sources=[source])
