"""Crash-safe training checkpoints.

On-disk layout, one directory per saved step::

    <run_dir>/checkpoints/step_000001000/
        model.safetensors   model weights (exact dtypes, no pickle)
        ema.safetensors     EMA weights (absent when the run keeps no EMA)
        state.pt            torch.save of a dict: optimizer, scheduler, RNG, data position, step...
        meta.json           written last: step, time, versions, the run's config, and the
                            sha256 and size of every other file

A checkpoint is complete iff meta.json exists and every file it lists has the recorded size and
sha256. Saving writes everything into a hidden `.tmp-step_...` directory, fsyncs each file and
the directory, then renames it into place, so a process killed at any instant (SIGKILL, power
loss after the fsyncs) leaves either the previous checkpoints untouched or the new one complete.
Readers only look at `step_*` directories, so half-written work is never picked up; it is
removed by the next successful save.

The latest checkpoint is found by scanning (no `latest` pointer that could go stale): the
highest step that verifies. Corrupt newer checkpoints are skipped with a warning and kept on
disk for inspection.

One process writes a run's checkpoints at a time (rank 0 in distributed training)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import fvdm
from fvdm.errors import CheckpointError
from fvdm.io.atomic import fsync_dir

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "verify_checkpoint", "find_latest",
           "scan_checkpoints", "list_checkpoints", "step_dir_name", "is_step_dir", "state_dict_mismatch"]

PathLike = Union[str, "os.PathLike[str]"]

CHECKPOINTS = "checkpoints"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "state.pt"
META = "meta.json"
FORMAT_VERSION = 1
_KNOWN_FILES = (MODEL, EMA, STATE)

_STEP_DIR = re.compile(r"step_(\d{9,})")
# Hidden work directories: being written (tmp), a replaced checkpoint (old), being deleted (trash).
_WORK_DIR = re.compile(r"\.(tmp|old|trash)-(step_\d{9,})-(\d+)-[0-9a-f]+")
# A work directory of a live process older than this is abandoned anyway (the pid was reused,
# or the writer runs on another host sharing the filesystem and its pid means nothing here).
STALE_AFTER_S = 24 * 3600
_HASH_CHUNK = 8 << 20
# Work directories this process is writing right now; never cleaned as stale.
_IN_PROGRESS: set[Path] = set()


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    meta: dict[str, Any]

    @property
    def config(self) -> dict[str, Any] | None:
        """The config dict given to `save_checkpoint`."""
        return self.meta.get("config")


def is_step_dir(path: PathLike) -> bool:
    """True if `path` is named like one checkpoint (`step_NNNNNNNNN`), complete or not."""
    return _STEP_DIR.fullmatch(Path(path).name) is not None


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint at `step` (`step_000001000`)."""
    return f"step_{step:09d}"


# --------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(run_dir: PathLike, step: int, model_state: Mapping[str, torch.Tensor],
                    ema_state: Mapping[str, torch.Tensor] | None, train_state: Mapping[str, Any],
                    config: Mapping[str, Any] | None = None, keep: int | None = 3) -> Path:
    """Write the checkpoint of `step` atomically and return its directory.

    `model_state` / `ema_state` are state dicts of tensors (tied or non-contiguous tensors are
    fine); `ema_state=None` writes no EMA file. `train_state` is a dict of optimizer and scheduler
    state dicts, the step... holding only what
    `torch.load(weights_only=True)` accepts: tensors, Python scalars, strings, lists, tuples, dicts.
    `config` must be JSON-serialisable (paths are written as strings).

    A checkpoint already saved for the same step is replaced. Afterwards only the `keep` newest
    checkpoints remain (`keep=0` or None keeps all), and work directories left by killed runs are
    removed. Raises CheckpointError when the directory cannot be written (permissions, full disk)."""
    _check_step(step)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise ValueError(f"keep must be a non-negative int or None, got {keep!r}")
    # Everything that can fail on bad input is checked before the disk is touched.
    model = _prepare_tensors(model_state, "model_state")
    ema = None if ema_state is None else _prepare_tensors(ema_state, "ema_state")
    if not isinstance(train_state, Mapping):
        raise TypeError(f"train_state must be a dict, got {type(train_state).__name__}")
    config_json = _config_to_json(config)

    ckpt_dir = Path(run_dir) / CHECKPOINTS
    final = ckpt_dir / step_dir_name(step)
    tmp: Path | None = None
    try:
        if not ckpt_dir.is_dir():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(ckpt_dir.parent)  # a new run directory's entry must survive a crash too
        tmp = _make_work_dir(ckpt_dir, "tmp", final.name)
        files = {MODEL: _write_safetensors(tmp / MODEL, model)}
        if ema is not None:
            files[EMA] = _write_safetensors(tmp / EMA, ema)
        files[STATE] = _write_state(tmp / STATE, train_state)
        _write_meta(tmp / META, step, config_json, files)
        fsync_dir(tmp)
        _publish(tmp, final)
    except OSError as e:
        raise CheckpointError(_write_error(final, e)) from e
    except (SafetensorError, RuntimeError) as e:
        # safetensors and torch.save report a failed write (a full disk) in their own types,
        # with the OS error only in the text; other RuntimeErrors are bugs and stay so.
        if isinstance(e, RuntimeError) and "writ" not in str(e):
            raise
        raise CheckpointError(_write_error(final, _as_os_error(e))) from e
    finally:
        if tmp is not None:
            _IN_PROGRESS.discard(tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # only still there if the save failed
    _tidy(ckpt_dir, keep, final)
    return final


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def _prepare_tensors(state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: contiguous, and no two sharing storage.

    Tied weights (one Parameter under two names) and views of one buffer share storage, which
    safetensors refuses; every tensor after the first on a storage is cloned. Loading gives
    separate tensors; `load_state_dict` copies them into the model, whose tying is unchanged."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{what} must be a dict of tensors, got {type(state).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(tensor).__name__}, not a tensor; "
                            "put non-tensor values in train_state")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")  # a fresh storage, but strides may still be permuted
        storage = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or (storage != 0 and storage in seen_storages):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        else:
            seen_storages.add(storage)
        out[name] = tensor
    return out


def _config_to_json(config: Mapping[str, Any] | None) -> Any:
    """`config` as JSON-compatible data (round-tripped now, so a bad value fails before writing)."""
    def default(value: Any) -> Any:
        if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
            return str(value)
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        raise TypeError(f"config value {value!r} ({type(value).__name__}) is not JSON-serialisable")
    return json.loads(json.dumps(config, default=default))


def _make_work_dir(ckpt_dir: Path, kind: str, name: str, create: bool = True) -> Path:
    """A fresh hidden `.<kind>-<name>-<pid>-<random>` path, registered as in progress."""
    path = ckpt_dir / f".{kind}-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    if create:
        path.mkdir()
    _IN_PROGRESS.add(path)
    return path


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    save_file(tensors, path, metadata={"format": "pt"})
    return _fsync_and_digest(path)


def _write_state(path: Path, train_state: Mapping[str, Any]) -> dict[str, Any]:
    with open(path, "wb") as f:
        torch.save(dict(train_state), f)
    _check_weights_only_loadable(path)
    return _fsync_and_digest(path)


def _check_weights_only_loadable(path: Path) -> None:
    """Refuse to write a state.pt that `torch.load(weights_only=True)` would refuse to read."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:  # torch < 2.5: the check happens on load instead
        return
    unsafe = finder(str(path))
    if unsafe:
        raise TypeError(f"train_state holds objects torch.load(weights_only=True) refuses ({', '.join(unsafe)}); "
                        "store tensors, Python scalars, strings, lists and dicts instead")


def _write_meta(path: Path, step: int, config: Any, files: dict[str, dict[str, Any]]) -> None:
    now = time.time()
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "time": now,
        "time_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "fvdm_version": fvdm.__version__,
        "torch_version": torch.__version__,
        "config": config,
        "files": files,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_and_digest(path: Path) -> dict[str, Any]:
    """Flush `path` to disk and return its sha256 and size, as recorded in meta.json."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        digest = _sha256_of(f)
        size = f.tell()
    return {"sha256": digest, "size": size}


def _sha256_of(f: Any) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`, replacing an existing checkpoint of that step.

    A directory cannot be renamed over a non-empty one, so an existing one is first moved aside
    to `.old-...`; if the process dies between the two renames, the next save puts it back."""
    if not final.exists():
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return
    old = _make_work_dir(final.parent, "old", final.name, create=False)
    try:
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(old, final)  # keep the existing checkpoint in place
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _IN_PROGRESS.discard(old)


def _as_os_error(e: Exception) -> OSError:
    """The OSError a writer's message describes (safetensors: 'IoError(Os { code: 28, ...'), so
    that the hint fits; errno 0 when it names none."""
    text = str(e)
    code = re.search(r"\bcode: (\d+)", text) or re.search(r"\berrno:? (\d+)", text)
    if code is None and "No space left" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if code is None:
        return OSError(0, _first_line(text) or type(e).__name__)
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _write_error(final: Path, e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", -1):
        hint = "free disk space or keep fewer checkpoints"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        hint = "make the run directory writable or choose another one"
    else:
        hint = "check the run directory"
    return f"cannot write checkpoint {final}: {reason}{where}; {hint}"


# --------------------------------------------------------------------------------------------
# Tidying after a save: stale work directories and old checkpoints


def _tidy(ckpt_dir: Path, keep: int | None, just_written: Path) -> None:
    """Best effort: the checkpoint is already safe, so failures here only warn."""
    try:
        _clean_work_dirs(ckpt_dir)
        if keep:
            _prune(ckpt_dir, keep, just_written)
    except OSError as e:
        warnings.warn(f"checkpoint {just_written} was saved, but tidying {ckpt_dir} failed: {e}", stacklevel=3)


def _clean_work_dirs(ckpt_dir: Path) -> None:
    """Remove work directories left by killed saves; put back a checkpoint moved aside for replacement."""
    for entry in ckpt_dir.iterdir():
        match = _WORK_DIR.fullmatch(entry.name)
        if match is None or entry in _IN_PROGRESS or not _is_abandoned(entry, int(match.group(3))):
            continue
        kind, final = match.group(1), ckpt_dir / match.group(2)
        if kind == "old" and not final.exists() and (entry / META).is_file():
            os.rename(entry, final)  # killed between moving the old one aside and the new one in
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _is_abandoned(entry: Path, pid: int) -> bool:
    """True if no live save owns work directory `entry`, created by process `pid`."""
    if pid == os.getpid():
        # Not in _IN_PROGRESS, so a failed save of ours, or of an earlier run that had our pid
        # (common in containers, where the trainer gets the same pid on every restart).
        return True
    if os.name == "posix" and not _pid_alive(pid):
        return True
    try:
        return time.time() - entry.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False  # removed meanwhile


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _prune(ckpt_dir: Path, keep: int, just_written: Path) -> None:
    """Delete all but the `keep` newest plausible checkpoints, never `just_written`.

    Only checkpoints whose files have the recorded sizes count (a full hash of every kept
    checkpoint on every save would be too slow); a broken one neither counts nor gets deleted,
    so the good ones before it survive and it stays for inspection."""
    plausible = [c for c in list_checkpoints(ckpt_dir) if c == just_written or _sizes_match(c)]
    keepers = set(plausible[-keep:]) | {just_written}
    for ckpt in plausible:
        if ckpt not in keepers:
            # Rename first: a deletion killed halfway leaves a hidden directory, not a broken step_*.
            trash = _make_work_dir(ckpt_dir, "trash", ckpt.name, create=False)
            try:
                os.rename(ckpt, trash)
                shutil.rmtree(trash, ignore_errors=True)
            finally:
                _IN_PROGRESS.discard(trash)


def _sizes_match(ckpt: Path) -> bool:
    try:
        meta = _read_meta(ckpt)
        return all((ckpt / name).stat().st_size == rec["size"] for name, rec in meta["files"].items())
    except (CheckpointError, OSError):
        return False


# --------------------------------------------------------------------------------------------
# Finding and verifying


def list_checkpoints(path: PathLike) -> list[Path]:
    """Complete-looking checkpoints (a `step_*` directory with a meta.json), oldest first.

    `path` is a run directory or its `checkpoints` directory. Files are not hashed here; use
    `verify_checkpoint` or `find_latest` for that."""
    ckpt_dir = _checkpoints_dir(Path(path))
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / META).is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def find_latest(path: PathLike) -> Path | None:
    """The newest complete and verified checkpoint under a run (or checkpoints) directory.

    Newer unusable checkpoints (corrupt, or without meta.json) are skipped with a warning
    naming them; they stay on disk for inspection. None if there is no good checkpoint (or no
    directory yet)."""
    latest, problems = scan_checkpoints(path)
    for problem in problems:
        warnings.warn(f"{problem}; skipping it (left on disk for inspection)", stacklevel=2)
    return latest


def scan_checkpoints(path: PathLike) -> tuple[Path | None, list[str]]:
    """(the newest verified checkpoint or None, why each newer `step_*` directory is unusable).

    Unlike `list_checkpoints`, `step_*` directories without a meta.json count here: they are
    reported, never skipped silently."""
    ckpt_dir = _checkpoints_dir(Path(path))
    if not ckpt_dir.is_dir():
        return None, []
    entries = sorted((int(m.group(1)), e) for e in ckpt_dir.iterdir() if (m := _STEP_DIR.fullmatch(e.name)))
    problems = []
    for _, ckpt in reversed(entries):
        try:
            _verify(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        return ckpt, problems
    return None, problems


def verify_checkpoint(path: PathLike) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint whose files match meta.json.

    The message says what is wrong and, for a broken checkpoint, names the previous good one."""
    path = Path(path)
    try:
        _verify(path)
    except CheckpointError as e:
        if path.is_dir() and _STEP_DIR.fullmatch(path.name):
            raise CheckpointError(f"{e}; {_previous_good_hint(path)}") from None
        raise


def _previous_good_hint(ckpt: Path) -> str:
    step = int(_STEP_DIR.fullmatch(ckpt.name).group(1))
    for older in reversed(list_checkpoints(ckpt.parent)):
        if int(older.name[len("step_"):]) >= step:
            continue
        try:
            _verify(older)
        except CheckpointError:
            continue
        return f"the previous good checkpoint is {older} (pass it, or the run directory, to resume)"
    return f"there is no earlier good checkpoint in {ckpt.parent}"


def _verify(ckpt: Path) -> dict[str, Any]:
    """Check `ckpt` completely and return its meta.json; CheckpointError without hints."""
    if not ckpt.exists():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is a file, not a checkpoint directory; "
                              "pass a checkpoints/step_NNNNNNNNN directory or a run directory")
    if not (ckpt / META).is_file():
        if _STEP_DIR.fullmatch(ckpt.name):
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: it has no {META} (deleted, or its write "
                                  "was interrupted)")
        raise CheckpointError(f"{ckpt} is not a checkpoint directory (no {META}); "
                              "pass a checkpoints/step_NNNNNNNNN directory or a run directory")
    meta = _read_meta(ckpt)
    for name, record in meta["files"].items():
        _check_file(ckpt, name, record)
    return meta


def _read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json, parsed and checked for the fields the checkpoint relies on."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {ckpt} is corrupt: {META} {what}")

    try:
        meta = json.loads((ckpt / META).read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {ckpt / META}: {e.strerror or e}") from e
    except UnicodeDecodeError:
        raise corrupt("is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise corrupt(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(meta, dict):
        raise corrupt("is not a JSON object")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise corrupt("has no valid 'step'")
    match = _STEP_DIR.fullmatch(ckpt.name)
    if match and int(match.group(1)) != step:
        raise corrupt(f"says step {step} but the directory is named {ckpt.name}")
    files = meta.get("files")
    if not isinstance(files, dict) or MODEL not in files or STATE not in files:
        raise corrupt(f"does not list {MODEL} and {STATE} under 'files'")
    for name, record in files.items():
        if name not in _KNOWN_FILES:  # also keeps a tampered meta.json from pointing elsewhere
            raise corrupt(f"lists an unknown file {name!r}")
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                and isinstance(record.get("size"), int)):
            raise corrupt(f"has no valid sha256 and size for {name}")
    return meta


def _check_file(ckpt: Path, name: str, record: dict[str, Any]) -> None:
    """Size, safetensors header, then sha256 (cheapest and most specific message first)."""
    path = ckpt / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} is missing") from None
    if size != record["size"]:
        how = "truncated" if size < record["size"] else "modified"
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} is {size} bytes but {META} "
                              f"records {record['size']} ({how})")
    try:
        with open(path, "rb") as f:
            if name.endswith(".safetensors"):
                problem = _safetensors_header_problem(f, size)
                if problem:
                    raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} has a bad safetensors header "
                                          f"({problem})")
                f.seek(0)
            digest = _sha256_of(f)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if digest != record["sha256"]:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {name} sha256 mismatch (truncated or modified)")


def _safetensors_header_problem(f: Any, size: int) -> str | None:
    """What is wrong with a safetensors file's header, or None.

    Format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
    dtype, shape and [begin, end) byte offsets into the data that follows."""
    if size < 8:
        return f"file has {size} bytes, fewer than the 8-byte header length"
    (length,) = struct.unpack("<Q", f.read(8))
    if length > size - 8:
        return f"header length {length} exceeds the file size {size}"
    try:
        header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"header is not valid JSON: {e}"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            return f"tensor {name!r} has invalid data offsets {offsets!r} for {data_size} data bytes"
    return None


# --------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu", *, verify: bool = True) -> Checkpoint:
    """Verify and load a checkpoint.

    `path` is a checkpoint directory, or a run directory / checkpoints directory meaning its
    newest good checkpoint (newer corrupt ones are skipped with a warning). Tensors are placed
    on `map_location`. Raises CheckpointError naming the path and the problem. verify=False
    skips hashing a checkpoint directory that `scan_checkpoints` has just verified."""
    if not verify and (Path(path) / META).is_file():
        ckpt, meta = Path(path), _read_meta(Path(path))
    else:
        ckpt, meta = _resolve(Path(path))
    device = str(map_location)
    model = _load_tensors(ckpt / MODEL, device)
    ema = _load_tensors(ckpt / EMA, device) if EMA in meta["files"] else None
    state = _load_state(ckpt / STATE, map_location)
    return Checkpoint(path=ckpt, step=meta["step"], model=model, ema=ema, state=state, meta=meta)


def _resolve(path: Path) -> tuple[Path, dict[str, Any]]:
    """The verified checkpoint directory `path` designates, and its meta.json."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file() or (path / META).exists() or _STEP_DIR.fullmatch(path.name):
        verify_checkpoint(path)
        return path, _read_meta(path)
    latest, problems = scan_checkpoints(path)  # verifies
    if latest is not None:
        for problem in problems:
            warnings.warn(f"{problem}; skipping it (left on disk for inspection)", stacklevel=3)
        return latest, _read_meta(latest)
    if problems:
        raise CheckpointError(f"no usable checkpoint in {_checkpoints_dir(path)}: {'; '.join(problems)}")
    raise CheckpointError(f"no checkpoint in {path}: expected {CHECKPOINTS}/step_NNNNNNNNN directories "
                          "with a meta.json; pass a run directory, its checkpoints directory or one checkpoint")


def _checkpoints_dir(path: Path) -> Path:
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def _load_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=device)
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {path.parent} is corrupt: cannot read {path.name} ({e})") from e


def _load_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; anything else is damaged
        raise CheckpointError(f"checkpoint {path.parent} is corrupt: {path.name} is not a torch.save zip archive")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"cannot load {path}: torch.load(weights_only=True) refuses it ({_unpickler_reason(e)}); "
                              "it was not written by fvdm.train.checkpoint") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path.parent} is corrupt: cannot read {path.name} ({e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path.parent} is corrupt: {path.name} holds a "
                              f"{type(state).__name__}, not a dict")
    return state


def _unpickler_reason(error: Exception) -> str:
    """The informative line of torch's multi-line weights_only error (which global it refused).

    torch's text also advises retrying with weights_only=False, which would run the file's code;
    no line that mentions weights_only is ever passed on."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for marker in ("WeightsUnpickler error", "GLOBAL", "unsupported", "Unsupported"):
        for line in lines:
            if marker in line and "weights_only" not in line:
                return line
    return "it holds objects other than tensors and plain Python data"


def state_dict_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """How `state` fails to fit `model`, in one line (None: it fits): how many tensors differ in
    shape, are missing or unexpected, with the first of each (load_state_dict's own message runs
    to hundreds of lines for a model of another size)."""
    own = model.state_dict()
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if shapes:
        k, theirs, ours = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) differ in shape (first {k}: checkpoint {list(theirs)}, "
                     f"model {list(ours)})")
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model (first {unexpected[0]})")
    return "; ".join(parts) or None
