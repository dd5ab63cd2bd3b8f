"""Files written atomically, and the JSON / JSONL records runs keep (metrics, logs, results).

Every writer writes a temporary file next to the target, fsyncs it and `os.replace`s it, so a
reader never sees half a file and a failed write leaves an existing file untouched. Parent
directories are created. A location that cannot be written raises `UserError`. Writers return
the `Path` they wrote. JSON is strict: non-finite floats become null.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fvdm.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory; on success it replaces `path`.

    On any exception the temporary file is removed and `path` is left as it was. OSErrors
    (permissions, missing space, a file where a directory should be) become UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _make_parent(path)
        # os.open with 0o666 lets the umask decide permissions, as for any normally created
        # file (mkstemp would leave the output readable by its owner only).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
        fsync_dir(path.parent)  # and the new name survives a power loss
    except OSError as e:
        raise _cannot_write(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in directory `path` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some network filesystems refuse it
            raise
    finally:
        os.close(fd)


def _make_parent(path: Path) -> None:
    """Create `path`'s directory; a file standing where a directory should be is named."""
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {path}: {parent} is a file, not a directory; choose another location")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


def _cannot_write(path: Path, e: OSError) -> UserError:
    """One line: the target, the OS's reason (naming another path if that is the culprit), a fix."""
    reason = e.strerror or str(e)
    name = os.fsdecode(e.filename) if e.filename else ""
    if name and name != str(path) and not name.endswith(".tmp"):
        reason += f" ({name})"
    return UserError(f"cannot write {path}: {reason}; choose another location or fix its permissions")


def write_json(path: str | Path, obj: object) -> Path:
    """Atomically write `obj` as indented JSON (non-finite floats become null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, default=_scalar) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write `text` (UTF-8) to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return Path(path)


def truncate_jsonl(path: str | Path, keep) -> int:
    """Atomically rewrite a metrics file keeping the records for which keep(record) is true (a
    truncated last line is dropped too); returns how many records were dropped. No file: 0."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if keep(r)]
    data = path.read_bytes()
    if len(kept) != len(records) or (data and not data.endswith(b"\n")):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line to a metrics file and flush it.

    A line cut short by a killed run (no trailing newline) is dropped first, so the new record
    starts on a line of its own. Non-finite floats are written as null (strict JSON)."""
    path = Path(path)
    line = json.dumps(_finite(record), default=_scalar) + "\n"
    try:
        _make_parent(path)
        with open(path, "ab+") as f:
            _drop_partial_line(f)
            f.write(line.encode())
            f.flush()
    except OSError as e:
        raise _cannot_write(path, e) from e


def _drop_partial_line(f: io.BufferedRandom) -> None:
    """Truncate an append-mode file back to its last newline (no-op if it ends with one)."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    # Scan back in blocks for the last newline; a partial line is short, so this is quick.
    end = size
    while end > 0:
        start = max(0, end - 4096)
        f.seek(start)
        cut = f.read(end - start).rfind(b"\n")
        if cut >= 0:
            f.truncate(start + cut + 1)
            return
        end = start
    f.truncate(0)


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics file; a truncated last line (a killed run) is ignored.

    Any other malformed line raises UserError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line had no newline: an interrupted write
                break
            raise UserError(f"{path}:{number}: not valid JSON; fix or delete that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _finite(obj: object) -> object:
    """Replace NaN/inf floats (anywhere in dicts/lists) by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _scalar(obj: object) -> object:
    """json default: numpy/torch scalars become Python numbers, paths strings."""
    if isinstance(obj, (np.generic, torch.Tensor)) and np.size(obj) == 1:
        value = obj.item()
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
