"""One training per run directory: an exclusive ``fcntl.flock`` on ``<run_dir>/run.lock``.

Two jobs writing one ``train.run_dir`` interleave their logs and prune each other's
checkpoints, so :class:`~mtfm_rec.training.trainer.Trainer` takes this lock at start (on rank
0 only; the other ranks learn the outcome by a broadcast) and holds it until ``close()``::

    lock = RunLock("runs/mine").acquire()   # RunDirLockedError if another live job holds it
    ...
    lock.release()                          # also at process exit; the OS releases it on a kill

The lock file holds the holder's host, pid and start time (JSON), which the error of a second
job quotes. ``flock`` rather than an ``O_EXCL`` marker because the kernel drops the lock when
its holder dies, even by SIGKILL, so a job restarted after a crash (torchrun restarts every
rank) takes it again at once. One case survives the holder: processes forked while it held the
lock (DataLoader workers, aggregation workers) share the locked file and keep it locked until
they exit. A lock whose recorded holder is a dead process *of this host* is therefore taken
over: a new lock file, locked before it appears, replaces the old one (the leftover processes
keep a lock on a file nobody opens any more), with a logged message. A holder on another host
cannot be checked and is never taken over.

Acquisition and takeover run under a second, short-lived flock on ``run.lock.guard``, so two
jobs starting at once cannot both take over the same stale lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
GUARD_NAME = "run.lock.guard"
_GUARD_WAIT_S = 30.0  # the guard is held for microseconds; waiting longer means a stuck process


class RunDirLockedError(RuntimeError):
    """Another live job holds the run directory's lock (the message says which)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a run lock."""

    host: str
    pid: int
    since: float  # time.time() when the lock was taken

    @classmethod
    def current(cls) -> "LockHolder":
        return cls(socket.gethostname(), os.getpid(), time.time())

    @classmethod
    def parse(cls, text: str) -> Optional["LockHolder"]:
        try:
            raw = json.loads(text)
            return cls(str(raw["host"]), int(raw["pid"]), float(raw["since"]))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def since_local(self) -> str:
        return datetime.datetime.fromtimestamp(self.since).astimezone().isoformat(timespec="seconds")

    def to_json(self) -> str:
        return json.dumps(
            {"host": self.host, "pid": self.pid, "since": self.since, "since_local": self.since_local}
        )

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since_local}"

    def is_dead_local_process(self) -> bool:
        """True when the holder ran on this host and that process no longer exists (a pid
        reused by a process started after the lock was taken counts as dead)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        started = _process_start_time(self.pid)
        return started is not None and started > self.since + 2.0  # /proc times: ~1 s coarse


def _process_start_time(pid: int) -> Optional[float]:
    """Start time (epoch seconds) of a local process from /proc, or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


def _write_fd(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


def _release_fd(fd: int, owner_pid: int) -> None:
    """Unlocks and closes; a no-op in a forked child, whose unlock would free the parent's lock
    (they share the open file description)."""
    if os.getpid() != owner_pid:
        return
    try:
        os.ftruncate(fd, 0)  # an unlocked file names no holder
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunLock:
    """The exclusive lock of one run directory (see the module docstring).

    Args:
        run_dir: the run directory (must exist).
        log: where the takeover of a stale lock is reported (default: this module's logger).
    """

    def __init__(self, run_dir: str, log: Optional[Callable[[str], None]] = None) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._log = log or logger.warning
        self._finalizer: Optional[weakref.finalize] = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> "RunLock":
        """Takes the lock or raises :class:`RunDirLockedError` naming the live holder."""
        if self.held:
            return self
        guard = self._take_guard()
        fd = -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_flock(fd):
                holder = LockHolder.parse(_read_fd(fd))
                os.close(fd)
                fd = -1
                fd = self._take_over(holder)
            _write_fd(fd, LockHolder.current().to_json())
        except BaseException:
            if fd >= 0:
                os.close(fd)  # drops the lock: nothing half-taken stays behind
            raise
        finally:
            os.close(guard)  # closing the fd drops the guard's flock
        # Released at interpreter exit or when this object is collected; the kernel releases
        # it anyway when the process dies.
        self._finalizer = weakref.finalize(self, _release_fd, fd, os.getpid())
        return self

    def release(self) -> None:
        """Gives the lock up (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def _take_guard(self) -> int:
        guard = os.open(os.path.join(self.run_dir, GUARD_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + _GUARD_WAIT_S
        while not _try_flock(guard):
            if time.monotonic() > deadline:
                os.close(guard)
                raise RunDirLockedError(
                    f"{self.run_dir}: {GUARD_NAME} stayed locked for {_GUARD_WAIT_S:.0f} s (a process "
                    "stuck while taking the run lock); retry, or use another train.run_dir"
                )
            time.sleep(0.05)
        return guard

    def _take_over(self, holder: Optional[LockHolder]) -> int:
        """A fresh locked lock file in place of one held for a dead local process; else raises."""
        if holder is None or not holder.is_dead_local_process():
            who = holder.describe() if holder is not None else "an unknown holder (no host/pid recorded)"
            same = (
                " (this process: another Trainer on this run_dir was not closed)"
                if (holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname())
                else ""
            )
            raise RunDirLockedError(
                f"{self.run_dir} is in use by another training: {who}{same}; lock file {self.path}. "
                "Wait for it to finish or stop it, or use another train.run_dir"
            )
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else has it
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._log(
            f"run lock {self.path}: taking over the stale lock of {holder.describe()} (that process is "
            "gone; processes it forked still held the file)"
        )
        return fd
