"""The output directory of an aggregation: refuse an unsafe one, publish the new one atomically.

An output inside, equal to or above the raw root is refused (:func:`output_location`); an
existing output is replaced only when it carries an mtfm_rec ``_SUCCESS`` marker and holds only
files an aggregation writes (:func:`check_replaceable`). The output is written into a hidden
temporary sibling and moved into place when complete (:func:`publish`): two renames on a local
filesystem, marker-last moves on an object store.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import uuid
from typing import Dict, List, Tuple

import fsspec
import fsspec.implementations.local

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.errors import AggregationError


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def _resolve(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, normalised path): local paths absolute with symlinks and ``..`` resolved."""
    fs, path = fsspec.core.url_to_fs(url)
    if _is_local(fs):
        return fs, os.path.realpath(path)
    return fs, posixpath.normpath(path.rstrip("/") or "/")


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def output_location(raw: str, out: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The output's (filesystem, path); refuses an output equal to, inside or above ``raw``."""
    raw_fs, raw_path = _resolve(raw)
    out_fs, out_path = _resolve(out)
    if type(raw_fs) is type(out_fs) and (_within(out_path, raw_path) or _within(raw_path, out_path)):
        how = (
            "the same directory as"
            if out_path == raw_path
            else "inside"
            if _within(out_path, raw_path)
            else "a parent of"
        )
        raise AggregationError(
            f"output directory {out} (--out) is {how} the raw dataset {raw} (--raw): writing "
            "it would overwrite or delete raw files; choose an output outside the raw dataset"
        )
    parent = posixpath.dirname(out_path)
    if not parent or parent == out_path:
        raise AggregationError(f"output directory {out} (--out): needs a parent directory")
    return out_fs, out_path


def check_replaceable(fs: fsspec.AbstractFileSystem, path: str, out: str) -> None:
    """Refuses an existing ``path`` unless it is empty or an output of ours with only our files."""
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise AggregationError(f"output directory {out} (--out): exists and is not a directory")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    if not names:
        return
    if not fmt.is_own_marker(fmt.read_marker(fs, path)):
        raise AggregationError(
            f"output directory {out} (--out): not empty ({len(names)} entries, e.g. {names[:3]}) "
            f"and no {fmt.SUCCESS_FILE} of mtfm_rec in it; refusing to delete or overwrite it: "
            "pass a new or empty directory, or an earlier aggregation output"
        )
    foreign = [n for n in names if not any(fnmatch.fnmatch(n, g) for g in fmt.OWN_FILE_GLOBS)]
    if foreign:
        raise AggregationError(
            f"output directory {out} (--out): an earlier aggregation output, but it also holds "
            f"{foreign[:5]}, which an aggregation does not write; refusing to delete them: "
            "move them away or pass another directory"
        )


def publish(
    fs: fsspec.AbstractFileSystem,
    out_path: str,
    out: str,
    shards: List[Tuple[str, str]],
    texts: Dict[str, str],
) -> None:
    """Writes the shards (local path, name) and then ``texts`` (name -> content, in order) into
    a hidden sibling of ``out_path``, then moves it into place."""
    parent, name = posixpath.split(out_path)
    stage = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    fs.makedirs(parent, exist_ok=True)
    fs.makedirs(stage, exist_ok=False)
    try:
        for src, dst in shards:
            fs.put_file(src, posixpath.join(stage, dst))
        for dst, text in texts.items():
            with fs.open(posixpath.join(stage, dst), "w") as fh:
                fh.write(text)
        check_replaceable(fs, out_path, out)  # again: it may have changed during the build
        _swap(fs, stage, out_path)
    finally:
        if fs.exists(stage):
            fs.rm(stage, recursive=True)


def _swap(fs: fsspec.AbstractFileSystem, stage: str, out_path: str) -> None:
    """Moves the complete ``stage`` to ``out_path``, replacing what is there (checked: ours)."""
    if _is_local(fs):
        # Two renames: at every moment ``out_path`` is the old output, absent, or the new one;
        # a crash in between leaves both, as hidden siblings (.<name>.old-*, .<name>.tmp-*).
        old = f"{stage.rsplit('.tmp-', 1)[0]}.old-{uuid.uuid4().hex[:12]}"
        if not os.path.isdir(out_path):
            os.rename(stage, out_path)
            return
        os.rename(out_path, old)
        try:
            os.rename(stage, out_path)
        except OSError:
            os.rename(old, out_path)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    # Object stores have no directory rename: remove the old files but its marker, move the new
    # files in, the new marker last (it overwrites the old one). Meanwhile the old marker's
    # shard list does not match, which the loader and ensure_aggregated detect.
    if fs.exists(out_path):
        for p in fs.ls(out_path, detail=False):
            if posixpath.basename(p.rstrip("/")) != fmt.SUCCESS_FILE:
                fs.rm(p, recursive=True)
    else:
        fs.makedirs(out_path, exist_ok=True)
    files = sorted(fs.ls(stage, detail=False), key=lambda p: posixpath.basename(p) == fmt.SUCCESS_FILE)
    for p in files:
        fs.mv(p, posixpath.join(out_path, posixpath.basename(p)))
