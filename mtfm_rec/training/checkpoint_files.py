"""A checkpoint's files on disk: layout, atomic writes, the manifest and its verification, pruning.

``mtfm_rec.training.checkpoint`` saves and loads the state (DCP tensors, loader positions, RNG);
this module owns what that leaves on disk (see its docstring for the directory layout): where a
step's directory is and whether it is complete, the ``COMPLETE`` manifest (size and sha256 of
every file) and the checks against it, choosing the newest checkpoint that verifies, pruning,
and the errors, so resume and inspection tools need no model or optimizer code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from mtfm_rec.training.distributed import all_gather, barrier, broadcast_from_rank0, get_rank, get_world_size

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST_VERSION = 1
_HASH_CHUNK = 16 << 20  # bytes read per hashlib update (which releases the GIL)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------- errors
class CheckpointError(RuntimeError):
    """Base of the errors this module raises about a checkpoint's files."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint (or every checkpoint of a root) failed verification against its manifest.

    Attributes:
        problems: checkpoint path -> what is wrong with it, one line per file.
    """

    def __init__(self, message: str, problems: Dict[str, List[str]]) -> None:
        super().__init__(message)
        self.problems = problems


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; the partial files were removed.

    Attributes:
        path: the checkpoint that was not written.
        errno: the OS error number behind it (``errno.ENOSPC`` for a full disk), or None.
    """

    def __init__(self, message: str, path: str, errno_: Optional[int]) -> None:
        super().__init__(message)
        self.path, self.errno = path, errno_


def root_cause(exc: BaseException) -> BaseException:
    """The first OSError behind ``exc`` (through causes and DCP's per-rank failures), else the
    first per-rank failure, else ``exc``."""
    seen: Set[int] = set()
    todo: List[Optional[BaseException]] = [exc]  # a cause or context may be None
    inner: Optional[BaseException] = None
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if isinstance(e, CheckpointException):
            failures = [f[0] for f in e.failures.values()]
            inner = inner or (failures[0] if failures else None)
            todo += failures
        todo += [e.__cause__, e.__context__]
    return inner or exc


def error_code(exc: BaseException) -> Optional[int]:
    if not isinstance(exc, OSError):
        return None
    if exc.errno is None and len(exc.args) == 1 and isinstance(exc.args[0], int):
        return exc.args[0]  # OSError(errno.ENOSPC): the code alone, not unpacked into errno
    return exc.errno


def write_error(final: str, root: str, exc: BaseException, what: str = "checkpoint") -> CheckpointWriteError:
    """The error every rank raises when checkpoint ``final`` (or another file under ``root``)
    could not be written."""
    cause = root_cause(exc)
    code = error_code(cause)
    newest = latest_checkpoint(root)
    kept = f"earlier checkpoints are intact (newest: {newest})" if newest else "no earlier checkpoint exists"
    if code in _DISK_FULL:
        try:
            free = f"{shutil.disk_usage(root).free} bytes free under {root}"
        except OSError:
            free = f"free space under {root} unknown"
        reason = f"the disk is full ({os.strerror(code)}; {free})"
        hint = " Free space (or lower train.keep_checkpoints), then resume."
    else:
        reason, hint = f"{type(cause).__name__}: {cause}", ""
    return CheckpointWriteError(
        f"{what} {final} was not written: {reason}. Its partial files were removed and {kept}.{hint}",
        final,
        code,
    )


# ---------------------------------------------------------------------------- layout
def checkpoint_path(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root``, or None (``.tmp`` and incomplete ignored)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (a temporary file, fsynced, renamed over it)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a full disk must not keep the half-written file
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- manifest
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(directory: str, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """name -> {"size", "sha256"} of files in ``directory``, hashed on a few threads."""

    def one(name: str) -> Dict[str, Any]:
        path = os.path.join(directory, name)
        return {"size": os.path.getsize(path), "sha256": sha256_file(path)}

    with ThreadPoolExecutor(max_workers=max(1, min(4, len(names)))) as pool:
        return dict(zip(names, pool.map(one, names)))


def own_dcp_files(directory: str, rank: int) -> List[str]:
    """The DCP data files rank ``rank`` wrote (DCP names them ``__<rank>_<i>.distcp``)."""
    own = re.compile(rf"^__{rank}_\d+\.distcp$")
    return sorted(n for n in os.listdir(directory) if own.match(n))


def manifest_files(directory: str) -> List[str]:
    """Every file of a checkpoint directory but the manifest itself."""
    return sorted(
        n
        for n in os.listdir(directory)
        if not n.startswith(COMPLETE) and os.path.isfile(os.path.join(directory, n))
    )


def read_manifest(path: str) -> Optional[Dict[str, Any]]:
    """The manifest in a checkpoint's ``COMPLETE`` ({"manifest_version", "step", "files":
    {name: {"size", "sha256"}}}), or None for a checkpoint written before manifests existed
    (``COMPLETE`` holds only the step).

    Raises:
        CheckpointError: ``COMPLETE`` is missing or is neither a manifest nor a bare step.
    """
    marker = os.path.join(path, COMPLETE)
    try:
        with open(marker) as fh:
            text = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"{COMPLETE}: missing (not a complete checkpoint)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{COMPLETE}: manifest unreadable ({exc})") from None
    if re.fullmatch(r"\s*\d+\s*", text):
        return None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{COMPLETE}: manifest unreadable (not JSON: {exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise CheckpointError(f'{COMPLETE}: manifest unreadable (no "files" with a size and sha256 each)')
    return manifest


def check_file(directory: str, name: str, expected: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with one file against its manifest entry, or None."""
    path = os.path.join(directory, name)
    try:
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{name}: size differs (manifest {expected['size']} bytes, on disk {size})"
        digest = sha256_file(path)
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: unreadable ({exc})"
    if digest != expected["sha256"]:
        return (
            f"{name}: checksum differs (sha256 in the manifest {expected['sha256'][:16]}...,"
            f" on disk {digest[:16]}...)"
        )
    return None


def verify_checkpoint(path: str, process_group: Optional[dist.ProcessGroup] = None) -> List[str]:
    """Checks every file of a checkpoint against its manifest; collective over the group.

    Each rank checks a share of the files (the largest files spread first), and the problems
    are gathered, so every rank returns the same list. A checkpoint without a manifest (written
    before manifests existed) is accepted with a logged warning.

    Returns:
        One line per problem (``"<file>: missing"``, ``"...: size differs (...)"``,
        ``"...: checksum differs (...)"``, ``"COMPLETE: manifest unreadable (...)"``); empty if
        the checkpoint verifies.
    """
    rank, world = get_rank(process_group), get_world_size(process_group)
    mine: List[str] = []
    legacy = False
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        mine.append(str(exc))
    else:
        legacy = manifest is None
        files = (manifest or {}).get("files", {})
        by_size = sorted(files, key=lambda n: (-files[n]["size"], n))
        mine += [p for p in (check_file(path, n, files[n]) for n in by_size[rank::world]) if p]
        name = re.match(_STEP_DIR, os.path.basename(os.path.normpath(path)))
        if rank == 0 and manifest is not None and name and manifest.get("step") != int(name.group(1)):
            mine.append(f"{COMPLETE}: the manifest is of step {manifest.get('step')}, not {name.group(1)}")
    problems = sorted({p for part in all_gather(mine, process_group) for p in part})
    if legacy and not problems and rank == 0:
        logger.warning(
            "%s has no manifest (written before checkpoints were checksummed): loading it unverified", path
        )
    return problems


def require_verified(path: str, process_group: Optional[dist.ProcessGroup]) -> None:
    """Raises :class:`CheckpointCorruptError` unless ``path`` verifies; collective."""
    problems = verify_checkpoint(path, process_group)
    if problems:
        raise CheckpointCorruptError(
            f"{path} fails verification against its manifest, so it is not loaded: "
            f"{'; '.join(problems)}. Restore the files, or resume from an older checkpoint "
            "(train.resume=auto takes the newest one that verifies).",
            {path: problems},
        )


def set_aside(path: str) -> str:
    """Renames a damaged checkpoint to ``step_<N>.damaged[.k]``, which nothing lists or prunes."""
    target, k = f"{path}.damaged", 1
    while os.path.exists(target):
        target, k = f"{path}.damaged.{k}", k + 1
    os.rename(path, target)
    return target


def select_checkpoint(root: str, process_group: Optional[dist.ProcessGroup] = None) -> Optional[str]:
    """The newest complete checkpoint under ``root`` that verifies; collective over the group.

    Newer checkpoints that fail are logged (each file and what is wrong) and set aside as
    ``step_<N>.damaged`` (rank 0), so that neither the latest checkpoint nor pruning counts
    them; their files are kept.

    Returns:
        The checkpoint path, or None if ``root`` holds no complete checkpoint.

    Raises:
        CheckpointCorruptError: ``root`` has complete checkpoints and none verifies (a run is
            never silently restarted from step 0).
    """
    rank = get_rank(process_group)
    found = broadcast_from_rank0(list_checkpoints(root) if rank == 0 else None, process_group)
    failed: Dict[str, List[str]] = {}
    for _, path in reversed(found):
        problems = verify_checkpoint(path, process_group)
        if not problems:
            break
        failed[path] = problems
        if rank == 0:
            logger.warning("checkpoint %s fails verification, skipped: %s", path, "; ".join(problems))
    else:
        if not failed:
            return None
        lines = "; ".join(f"{os.path.basename(p)}: {', '.join(v)}" for p, v in failed.items())
        raise CheckpointCorruptError(
            f"no checkpoint under {root} verifies against its manifest, so the run cannot resume "
            f"(and is not restarted from step 0): {lines}. Restore the files, or start over with "
            "train.resume=never or a new train.run_dir.",
            failed,
        )
    if rank == 0:
        for bad in failed:
            try:  # a convenience only: a damaged checkpoint fails verification again next time
                logger.warning("damaged checkpoint %s set aside as %s", bad, set_aside(bad))
            except OSError as exc:  # raising here would leave the other ranks in the barrier
                logger.warning("damaged checkpoint %s could not be set aside (%s); it is skipped", bad, exc)
    barrier(process_group)
    return path


def prune_checkpoints(root: str, keep_last: int, keep: Sequence[str] = ()) -> List[str]:
    """Deletes complete checkpoints but the newest ``keep_last`` and those in ``keep``, and any
    ``.tmp`` or incomplete directory older than the newest complete checkpoint.

    Returns:
        The deleted paths. Call on one rank only.
    """
    found = list_checkpoints(root)
    if not found:
        return []
    protect = {os.path.abspath(p) for p in keep}
    protect |= {os.path.abspath(p) for _, p in (found[-keep_last:] if keep_last > 0 else [])}
    newest = found[-1][0]
    deleted = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        m = re.match(r"^step_(\d+)(\.tmp)?$", name)
        if not m or os.path.abspath(path) in protect:
            continue
        stale = int(m.group(1)) < newest and (m.group(2) or not is_complete(path))
        if (is_complete(path) and not m.group(2)) or stale:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
            logger.info("pruned checkpoint %s", path)
    return deleted
