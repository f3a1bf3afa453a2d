"""One run per output folder: an exclusive lock while a run writes there, and no silent reuse.

`claim_output_dir(path, resume=..., overwrite=...)` is called before any work:
- a path that exists but is not a folder, or a folder that cannot be written, is refused;
- a folder another run holds (its lock is taken) is refused: two runs never mix their files;
- a folder with a finished or killed run's files is refused unless `resume` (continue it
  from last.pt) or `overwrite` (its run files are removed first); `resume` where there is no
  last.pt to continue from starts afresh, without the killed run's logs.
The lock (`.lock`, an OS file lock through the `filelock` package) goes with the process: a
killed run leaves no stale lock behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

LOCK = ".lock"
# files and folders a run writes; their presence means the folder was used
RUN_FILES = ("last.pt", "model.pt", "best.pt", "model.safetensors", "config.json",
             "metrics.jsonl", "result.json", "tensorboard")


class OutputDirError(ValueError):
    """An output folder that cannot be used for this run (in use, used before, not writable)."""


class OutputDir:
    """A claimed output folder: `path`, held until `release()` (or the end of a `with`)."""

    def __init__(self, path: Path, lock: FileLock) -> None:
        self.path, self._lock = path, lock

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


def previous_run_files(path: Path) -> list[str]:
    """Names of a previous run's files in `path`."""
    return [name for name in RUN_FILES if (path / name).exists()]


def claim_output_dir(path: str | os.PathLike, *, resume: bool = False,
                     overwrite: bool = False, flags: bool = False) -> OutputDir:
    """Create and lock `path` for one run; see the module docstring for what is refused.
    `flags=True` words the advice as command-line flags (--resume, --overwrite)."""
    path = Path(path)
    resume_hint = "--resume" if flags else "resume=True"
    overwrite_hint = "--overwrite" if flags else "overwrite=True"
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output folder {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path / LOCK, timeout=0)
        lock.acquire()
    except Timeout:
        raise OutputDirError(f"output folder {str(path)!r} is in use by another run (its "
                             f"{LOCK} is locked); wait for it or choose another folder") from None
    except OSError as exc:
        raise OutputDirError(f"output folder {str(path)!r} cannot be written: "
                             f"{exc.strerror or exc}") from None
    claimed = OutputDir(path, lock)
    try:
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputDirError(f"output folder {str(path)!r} is not writable")
        used = previous_run_files(path)
        if used and resume and not (path / "last.pt").exists():
            overwrite = True  # a run killed before its first checkpoint: nothing to resume
        if used and overwrite:
            for name in used:
                target = path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        elif used and not resume:
            raise OutputDirError(
                f"output folder {str(path)!r} holds a previous run ({', '.join(used)}); "
                f"pass {resume_hint} to continue it or {overwrite_hint} to replace it")
    except BaseException:
        claimed.release()
        raise
    return claimed
