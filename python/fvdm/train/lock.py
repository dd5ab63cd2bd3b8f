"""One trainer per run directory: an OS file lock on <run>/train.lock.

The lock is `flock` on an open file, so the kernel drops it the moment its process ends,
however it ends (SIGKILL, power loss): a stale lock file never blocks a later run. The file
holds the owner's pid, for the message a second trainer gets. Only training takes the lock;
`sample` and `eval` only read a run and keep working while it trains.

Not for distributed launches across hosts on a network filesystem whose flock is local only:
there the lock protects against a second launch on the same host."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fvdm.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

LOCK_FILE = "train.lock"


class RunLock:
    """Held from acquire() until release() (or until the process ends)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file = None

    def acquire(self) -> RunLock:
        if fcntl is None or self._file is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+b")
        except OSError as e:
            raise UserError(f"cannot write the run directory {self.run_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise UserError(f"cannot lock {self.path}: {e.strerror or e}") from None
            raise UserError(f"{self.run_dir} is in use: {self._holder()} is training in it (lock {self.path}); "
                            "wait for it to finish or stop it, or choose another --out") from None
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n".encode())
            f.flush()
        except OSError:
            pass  # the lock holds without the pid; the pid is only for the message above
        self._file = f
        return self

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock; the file stays (deleting it would race)
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
