"""Rank- and worker-sharded, shuffling, resumable loading of aggregated shards into batches.

The scheme (docs/LOADER.md has the full story):

* **Units** are the row groups of the ``part-*.parquet`` shards, in shard-name order. Their
  sample counts come from Parquet metadata (``split="all"``) or from a cheap, cacheable pre-scan
  of the ``exp/<s>/ts`` and ``exp/<s>/split`` columns (other splits). Every rank computes the
  same counts, so all ranks agree on every size below without communicating.
* Each epoch the units are permuted (seeded by ``seed`` and ``epoch``) and their samples are
  laid end to end as one global sequence ``0 .. T-1``. Rank ``r`` takes a contiguous range of
  it, and the rank's batches are split into contiguous blocks, one per DataLoader worker.
* Training (``pad_to_equal_batches=False``): every rank takes ``T // world_size`` samples and
  yields ``(T // world_size) // batch_size`` full batches; the rest is dropped for this epoch.
  Evaluation (``pad_to_equal_batches=True``): every rank yields
  ``ceil(ceil(T / world_size) / batch_size)`` full batches; the tail is filled with repeats of
  real samples whose ``label_mask`` is all False, and no sample is dropped.
* Each worker shuffles its block of samples through a seeded shuffle buffer. The shuffle is
  computed on sample indices, so a restored worker knows exactly which samples it already
  yielded and reads only the row groups it still needs.
* DataLoader hands batches out round-robin over workers; a restored iteration rotates the
  workers' roles so that global batch ``i`` always comes from logical stream ``i % W``. The
  global count of consumed batches is therefore the whole position (see
  :class:`ResumableLoader`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.utils.data

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.config import DataConfig
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.training.distributed import get_rank, get_world_size

SPLITS = ("train", "valid", "test", "all")
_SPLIT_CODE = {"train": fmt.SPLIT_TRAIN, "valid": fmt.SPLIT_VALID, "test": fmt.SPLIT_TEST}
_MAX_LIVE_CHUNKS = 16  # compact held rows once this many row-group tables are kept alive
STATE_VERSION = 1


class LoaderError(ValueError):
    """A dataset directory or loader state the loader cannot use; the message says why."""


# -------------------------------------------------------------------- splits
def exposure_split(
    ts: np.ndarray,
    split_col: np.ndarray,
    eval_after: Optional[int],
    valid_after: Optional[int],
) -> np.ndarray:
    """The split code (0 train, 1 valid, 2 test) of each exposure.

    An explicit ``split`` value (>= 0) wins; otherwise the exposure is split by time:
    ``ts >= eval_after`` is test, ``valid_after <= ts < eval_after`` is valid, the rest train.

    Args:
        ts: exposure timestamps (dataset ticks).
        split_col: the stored ``exp/<s>/split`` values (``-1``: split by time).
        eval_after: first test tick, or None (no test by time).
        valid_after: first validation tick, or None (no validation by time).
    """
    out = np.full(len(ts), fmt.SPLIT_TRAIN, np.int8)
    if valid_after is not None:
        out[ts >= valid_after] = fmt.SPLIT_VALID
    if eval_after is not None:
        out[ts >= eval_after] = fmt.SPLIT_TEST
    explicit = split_col >= 0
    out[explicit] = split_col[explicit]
    return out


def split_masks(
    table: pa.Table,
    schema: DatasetSchema,
    split: str,
    eval_after: Optional[int],
    valid_after: Optional[int],
) -> Tuple[np.ndarray, Optional[Dict[str, np.ndarray]]]:
    """Which rows and exposures of ``table`` belong to ``split``.

    Returns:
        (row_keep [num_rows] bool, exposure_keep per scenario over the flattened exposures, or
        None for ``split="all"``). A row is kept when at least one of its exposures is.
    """
    if split == "all":
        return np.ones(table.num_rows, bool), None
    code = _SPLIT_CODE[split]
    row_keep = np.zeros(table.num_rows, bool)
    exposure_keep: Dict[str, np.ndarray] = {}
    for s in schema.scenarios:
        ts_col = table.column(fmt.exp_ts(s.name))
        lengths = pc.fill_null(pc.list_value_length(ts_col), 0).to_numpy().astype(np.int64)
        ts = pc.list_flatten(ts_col).to_numpy(zero_copy_only=False).astype(np.int64)
        raw_split = pc.list_flatten(table.column(fmt.exp_split(s.name)))
        raw_split = raw_split.to_numpy(zero_copy_only=False).astype(np.int8)
        if len(raw_split) != len(ts):
            raise LoaderError(
                f"{fmt.exp_split(s.name)} and {fmt.exp_ts(s.name)} differ in length; "
                "all list columns of a scenario must share lengths"
            )
        keep = exposure_split(ts, raw_split, eval_after, valid_after) == code
        exposure_keep[s.name] = keep
        rows = np.repeat(np.arange(table.num_rows), lengths)
        row_keep[rows[keep]] = True
    return row_keep, exposure_keep


# -------------------------------------------------------------------- units and the pre-scan
@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the unit of reading and of assignment."""

    path: str  # shard path inside the filesystem (no protocol)
    row_group: int
    num_rows: int  # rows in the row group
    count: int  # rows of the selected split


def _split_columns(schema: DatasetSchema) -> List[str]:
    cols: List[str] = []
    for s in schema.scenarios:
        cols += [fmt.exp_ts(s.name), fmt.exp_split(s.name)]
    return cols


def _list_units(
    fs: fsspec.AbstractFileSystem, root: str, schema: DatasetSchema, require_success: bool
) -> Tuple[List[Tuple[str, int, int]], str]:
    """(path, row_group, num_rows) of every row group, and a fingerprint of the dataset.

    With a ``_SUCCESS`` of mtfm_rec, the shards on disk must be exactly those it lists, with
    its byte sizes and row counts (:func:`sample_format.check_shards`).
    """
    record = fmt.read_marker(fs, root)
    own = fmt.is_own_marker(record)
    if require_success:
        if record is None:
            raise LoaderError(
                f"{root}: no {fmt.SUCCESS_FILE} marker; aggregation did not finish (or pass "
                "require_success=False)"
            )
        if not own or "shards" not in record:
            what = "has no shard list (format_version 1)" if own else "is not an mtfm_rec marker"
            raise LoaderError(
                f"{root}/{fmt.SUCCESS_FILE} {what}; re-run the aggregation (or pass "
                "require_success=False to read the shards unchecked)"
            )
    metas, problems = fmt.check_shards(fs, root, record if own else None)
    if problems:
        raise LoaderError(
            f"{root}: the shards do not match what the aggregation wrote: "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + "; re-run the aggregation"
        )
    if not metas:
        raise LoaderError(f"{root}: no {fmt.SHARD_GLOB} shards")
    expected = fmt.arrow_schema(schema)
    units: List[Tuple[str, int, int]] = []
    digest = hashlib.sha256()
    for path, meta in metas.items():
        names = set(meta.schema.to_arrow_schema().names)
        missing = [f.name for f in expected if f.name not in names]
        if missing:
            raise LoaderError(f"{path}: missing columns {missing[:5]} of the aggregated format")
        digest.update(f"{path}:{meta.num_rows}:{meta.num_row_groups};".encode())
        for i in range(meta.num_row_groups):
            units.append((path, i, meta.row_group(i).num_rows))
    if record is not None:
        with fs.open(f"{root}/{fmt.SUCCESS_FILE}", "rb") as fh:
            digest.update(fh.read())
    return units, digest.hexdigest()


def _unreadable(path: str, row_group: int, exc: Exception) -> LoaderError:
    """The error for a shard that fails to open or read (pyarrow's own names no file)."""
    return LoaderError(
        f"{path} row group {row_group}: unreadable ({type(exc).__name__}: {exc}); re-run the aggregation"
    )


def _prescan(
    fs: fsspec.AbstractFileSystem,
    units: Sequence[Tuple[str, int, int]],
    schema: DatasetSchema,
    split: str,
    eval_after: Optional[int],
    valid_after: Optional[int],
) -> List[int]:
    """Rows of ``split`` per unit, reading only the exposure ts and split columns."""
    counts: List[int] = []
    columns = _split_columns(schema)
    open_path, pf, fh = None, None, None
    try:
        for path, rg, _ in units:
            try:
                if path != open_path:
                    if fh is not None:
                        fh.close()
                    fh = fs.open(path, "rb")
                    pf, open_path = pq.ParquetFile(fh), path
                assert pf is not None  # opened above, for this path or an earlier unit's
                table = pf.read_row_group(rg, columns=columns)
            except (pa.ArrowException, OSError) as exc:
                raise _unreadable(path, rg, exc) from exc
            row_keep, _ = split_masks(table, schema, split, eval_after, valid_after)
            counts.append(int(row_keep.sum()))
    finally:
        if fh is not None:
            fh.close()
    return counts


def _cached_counts(
    cache_dir: Optional[str],
    key: str,
    compute: Callable[[], List[int]],
) -> List[int]:
    """Per-unit counts from ``cache_dir`` (any fsspec URL) or ``compute()``, then cached."""
    if cache_dir is None:
        return compute()
    fs, root = fsspec.core.url_to_fs(cache_dir)
    path = f"{root.rstrip('/')}/loader-index-{key[:32]}.json"
    if fs.exists(path):
        with fs.open(path, "r") as fh:
            cached = json.load(fh)
        if cached.get("key") == key:
            return [int(c) for c in cached["counts"]]
    counts = compute()
    fs.makedirs(root, exist_ok=True)
    tmp = f"{path}.tmp-{np.random.default_rng().integers(1 << 62)}"
    with fs.open(tmp, "w") as fh:
        json.dump({"key": key, "counts": counts}, fh)
    fs.mv(tmp, path)  # atomic on local filesystems: concurrent ranks write the same content
    return counts


# -------------------------------------------------------------------- the plan
def batches_per_stream(num_batches: int, num_streams: int) -> List[int]:
    """Batches of each worker stream when ``num_batches`` are dealt out round-robin."""
    base, extra = divmod(num_batches, num_streams)
    return [base + (w < extra) for w in range(num_streams)]


def consumed_per_stream(consumed: int, num_streams: int) -> List[int]:
    """Batches each stream has yielded once ``consumed`` round-robin batches were consumed."""
    return [(consumed - w + num_streams - 1) // num_streams for w in range(num_streams)]


def shuffle_buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer_size`` emits inputs ``0 .. n-1``.

    Classic streaming buffer: fill it, then for each new input emit a uniformly chosen held
    element and put the input in its place; drain the rest in random order. Output ``j`` is
    always an input ``<= j + buffer_size``, so a reader following the inputs holds at most
    ``buffer_size`` samples (plus one row group).
    """
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    k = min(buffer_size, n)
    held = list(range(k))
    draws = rng.integers(0, k, size=n - k).tolist()
    out: List[int] = []
    append = out.append
    for i, r in zip(range(k, n), draws):
        append(held[r])
        held[r] = i
    out.extend(np.asarray(held, np.int64)[rng.permutation(k)].tolist())
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class _Segment:
    """Plan positions ``[p0, p0 + rows)`` are kept rows ``[r0, r0 + rows)`` of unit ``unit``."""

    p0: int
    unit: int
    r0: int
    rows: int


class ShardedBatchDataset(torch.utils.data.IterableDataset):
    """Yields :class:`Batch` objects of one rank from an aggregated dataset directory.

    Attributes ``epoch`` and ``start_batch`` (batches of this epoch already consumed by this
    rank) are read when iteration starts; :class:`ResumableLoader` sets them. Iterate it
    through a DataLoader with ``batch_size=None`` (see :func:`build_dataloader`).

    Args:
        path: dataset directory (local path or fsspec URL) with ``part-*.parquet`` shards.
        batch_size: samples per batch (per rank).
        split: ``train``, ``valid``, ``test`` or ``all``.
        schema: the dataset schema; read from ``<path>/dataset.yaml`` when None.
        eval_after: first test tick (exposures with ``ts >= eval_after``), or None.
        valid_after: first validation tick, or None.
        rank: this rank; from torch.distributed (or 0) when None.
        world_size: number of ranks; from torch.distributed (or 1) when None.
        shuffle: permute units per epoch and shuffle samples; defaults to ``split == "train"``.
        shuffle_buffer: samples held by each worker's shuffle buffer (<= 1: no buffer).
        seed: base seed; with the epoch it fixes every random choice.
        pad_to_equal_batches: evaluation mode (pad, never drop) instead of training mode.
        index_cache_dir: where to cache the per-split pre-scan (path or fsspec URL), or None.
        require_success: refuse a directory without an mtfm_rec ``_SUCCESS`` listing its
            shards. Either way, shards that differ from a listing ``_SUCCESS`` are refused.
    """

    def __init__(
        self,
        path: str,
        batch_size: int,
        split: str = "train",
        schema: Optional[DatasetSchema] = None,
        eval_after: Optional[int] = None,
        valid_after: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        shuffle: Optional[bool] = None,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        pad_to_equal_batches: bool = False,
        index_cache_dir: Optional[str] = None,
        require_success: bool = True,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise LoaderError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1:
            raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} outside world_size {self.world_size}")
        self.path = path
        self.schema = schema if schema is not None else DatasetSchema.load(path)
        self.batch_size = batch_size
        self.split = split
        self.eval_after = eval_after
        self.valid_after = valid_after
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.pad_to_equal_batches = pad_to_equal_batches
        self.epoch = 0
        self.start_batch = 0

        fs, root = fsspec.core.url_to_fs(path)
        self._fs = fs
        raw_units, fingerprint = _list_units(fs, root.rstrip("/"), self.schema, require_success)
        if split == "all":
            counts = [n for _, _, n in raw_units]
        else:
            key = hashlib.sha256(
                json.dumps([fingerprint, split, eval_after, valid_after, self.schema.to_dict()]).encode()
            ).hexdigest()
            counts = _cached_counts(
                index_cache_dir,
                key,
                lambda: _prescan(fs, raw_units, self.schema, split, eval_after, valid_after),
            )
        self.units: List[Unit] = [Unit(p, rg, n, c) for (p, rg, n), c in zip(raw_units, counts)]
        self.num_samples = sum(u.count for u in self.units)  # T: samples of the split

    # ---------------------------------------------------------------- sizes
    def num_batches(self) -> int:
        """Batches every rank yields per epoch (the same on all ranks and epochs)."""
        t, world, b = self.num_samples, self.world_size, self.batch_size
        if self.pad_to_equal_batches:
            return math.ceil(math.ceil(t / world) / b)
        return (t // world) // b

    def _rank_range(self) -> Tuple[int, int]:
        """(start, real samples) of this rank's contiguous range of the epoch sequence."""
        t, world, r = self.num_samples, self.world_size, self.rank
        if self.pad_to_equal_batches:
            start = r * t // world
            return start, (r + 1) * t // world - start
        per_rank = t // world
        return r * per_rank, per_rank

    def _unit_order(self, epoch: int) -> np.ndarray:
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.units))
        return order[[self.units[i].count > 0 for i in order]]

    def stream_plan(self, epoch: int, stream: int, num_streams: int) -> Tuple[np.ndarray, np.ndarray]:
        """The samples of one worker stream, before shuffling.

        Returns:
            (global index into the epoch sequence, is_padding) per plan position; the stream
            yields ``len // batch_size`` batches.
        """
        counts = batches_per_stream(self.num_batches(), num_streams)
        first = sum(counts[:stream]) * self.batch_size
        q = np.arange(first, first + counts[stream] * self.batch_size, dtype=np.int64)
        start, real = self._rank_range()
        if self.num_samples == 0:
            return q, np.zeros(0, bool)
        return (start + q) % self.num_samples, q >= real

    def _segments(self, order: np.ndarray, plan: np.ndarray) -> List[_Segment]:
        """Cuts the plan (runs of consecutive global indices) into per-unit segments."""
        cum = np.concatenate([[0], np.cumsum([self.units[i].count for i in order])])
        segments: List[_Segment] = []
        if len(plan) == 0:
            return segments
        breaks = np.flatnonzero(np.diff(plan) != 1) + 1
        for run_start, run_end in zip(np.r_[0, breaks], np.r_[breaks, len(plan)]):
            g0, g1 = int(plan[run_start]), int(plan[run_end - 1]) + 1
            k = int(np.searchsorted(cum, g0, side="right")) - 1
            while k < len(order) and cum[k] < g1:
                lo, hi = max(g0, int(cum[k])), min(g1, int(cum[k + 1]))
                if hi > lo:
                    segments.append(
                        _Segment(int(run_start) + lo - g0, int(order[k]), lo - int(cum[k]), hi - lo)
                    )
                k += 1
        return segments

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        num_streams = 1 if info is None else info.num_workers
        worker = 0 if info is None else info.id
        # Rotate roles so that the first batch of this iteration (global batch start_batch)
        # comes from DataLoader worker 0, which is whom DataLoader asks first.
        stream = (worker + self.start_batch) % num_streams
        skip = consumed_per_stream(self.start_batch, num_streams)[stream]
        return self._iter_stream(self.epoch, stream, num_streams, skip)

    def _iter_stream(self, epoch: int, stream: int, num_streams: int, skip: int) -> Iterator[Batch]:
        b = self.batch_size
        plan, is_pad = self.stream_plan(epoch, stream, num_streams)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1, self.rank, stream])
            perm = shuffle_buffer_order(len(plan), self.shuffle_buffer, rng)
        else:
            perm = np.arange(len(plan), dtype=np.int64)
        perm = perm[skip * b :]
        if len(perm) == 0:
            return
        needed = np.zeros(len(plan), bool)
        needed[perm] = True
        segments = self._segments(self._unit_order(epoch), plan)
        seg_starts = np.array([s.p0 for s in segments], dtype=np.int64)
        reader = _RowReader(self)
        held: Dict[int, Tuple[int, int]] = {}  # plan position -> (chunk id, row)
        chunks: Dict[int, pa.Table] = {}  # live row-group slices by id
        refs: Dict[int, int] = {}  # chunk id -> held rows still pointing into it
        ids = itertools.count()
        cursor = 0
        for j in range(0, len(perm), b):
            out = perm[j : j + b]
            last_seg = int(np.searchsorted(seg_starts, out.max(), side="right")) - 1
            while cursor <= last_seg:
                seg = segments[cursor]
                cursor += 1
                pos = np.arange(seg.p0, seg.p0 + seg.rows)
                want = needed[pos]
                if not want.any():
                    continue
                rows = reader.kept_rows(seg.unit)[seg.r0 : seg.r0 + seg.rows][want]
                cid = next(ids)
                chunks[cid] = reader.table(seg.unit).take(pa.array(rows))
                refs[cid] = len(rows)
                for i, p in enumerate(pos[want].tolist()):
                    held[p] = (cid, i)
                if len(chunks) > _MAX_LIVE_CHUNKS:
                    chunks, refs = _compact(held, chunks, next(ids))
            yield self._make_batch(out, held, chunks, refs, is_pad[out])

    def _make_batch(
        self,
        out: np.ndarray,
        held: Dict[int, Tuple[int, int]],
        chunks: Dict[int, pa.Table],
        refs: Dict[int, int],
        pad: np.ndarray,
    ) -> Batch:
        where = [held.pop(int(p)) for p in out]
        cids = np.array([c for c, _ in where], dtype=np.int64)
        rows = np.array([r for _, r in where], dtype=np.int64)
        order = np.argsort(cids, kind="stable")
        parts = []
        for cid in np.unique(cids).tolist():
            sel = rows[cids == cid]
            parts.append(chunks[cid].take(pa.array(sel)))
            refs[cid] -= len(sel)
            if refs[cid] == 0:
                del chunks[cid], refs[cid]
        grouped = pa.concat_tables(parts).combine_chunks()
        inverse = np.empty(len(order), np.int64)
        inverse[order] = np.arange(len(order))
        table = grouped.take(pa.array(inverse))  # back to the shuffled order
        _, exposure_keep = split_masks(table, self.schema, self.split, self.eval_after, self.valid_after)
        batch = collate(table, self.schema, exposure_keep)
        if pad.any():
            pad_rows = torch.from_numpy(pad)
            for s, mask in batch.label_mask.items():
                mask[pad_rows[batch.exposure_sample[s]]] = False
        return batch


def _compact(
    held: Dict[int, Tuple[int, int]], chunks: Dict[int, pa.Table], new_id: int
) -> Tuple[Dict[int, pa.Table], Dict[int, int]]:
    """Copies every held row into one table so that finished row groups can be freed."""
    positions = list(held)
    parts = []
    by_chunk: Dict[int, List[int]] = {}
    for p in positions:
        by_chunk.setdefault(held[p][0], []).append(p)
    offset = 0
    for cid, ps in by_chunk.items():
        parts.append(chunks[cid].take(pa.array([held[p][1] for p in ps])))
        for i, p in enumerate(ps):
            held[p] = (new_id, offset + i)
        offset += len(ps)
    if not parts:
        return {}, {}
    return {new_id: pa.concat_tables(parts).combine_chunks()}, {new_id: offset}


class _RowReader:
    """Reads units (row groups) and their split-filtered rows, caching the last one."""

    def __init__(self, dataset: ShardedBatchDataset) -> None:
        self._ds = dataset
        self._columns = fmt.arrow_schema(dataset.schema).names
        self._unit: Optional[int] = None
        self._table: Optional[pa.Table] = None
        self._kept: Optional[np.ndarray] = None

    def _load(self, unit: int) -> None:
        if unit == self._unit:
            return
        ds = self._ds
        u = ds.units[unit]
        try:
            with ds._fs.open(u.path, "rb") as fh:
                table = pq.ParquetFile(fh).read_row_group(u.row_group, columns=self._columns)
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(u.path, u.row_group, exc) from exc
        row_keep, _ = split_masks(table, ds.schema, ds.split, ds.eval_after, ds.valid_after)
        kept = np.flatnonzero(row_keep)
        if len(kept) != u.count:
            raise LoaderError(
                f"{u.path} row group {u.row_group}: {len(kept)} rows of split {ds.split!r}, "
                f"the index says {u.count}; the dataset changed (clear the index cache)"
            )
        self._unit, self._table, self._kept = unit, table, kept

    def table(self, unit: int) -> pa.Table:
        self._load(unit)
        assert self._table is not None
        return self._table

    def kept_rows(self, unit: int) -> np.ndarray:
        self._load(unit)
        assert self._kept is not None
        return self._kept


# -------------------------------------------------------------------- DataLoader + resume
def _identity(batch: Batch) -> Batch:
    return batch


def build_dataloader(
    dataset: ShardedBatchDataset,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: Optional[bool] = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` (which yields whole batches, hence ``batch_size=None``).

    Args:
        dataset: the sharded dataset.
        num_workers: worker processes (0: load in the calling process).
        prefetch_factor: batches each worker prepares ahead (ignored without workers).
        pin_memory: pin batches in page-locked memory; defaults to CUDA availability, and is
            never enabled without CUDA.
    """
    cuda = torch.cuda.is_available()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=cuda if pin_memory is None else (pin_memory and cuda),
        # With batch_size=None torch calls collate_fn on each item (a whole Batch); its stub
        # types only the batched case, a function of a list of samples.
        collate_fn=_identity,  # type: ignore[arg-type]
        persistent_workers=False,  # workers must see each iteration's epoch / start_batch
    )


class ResumableLoader:
    """Owns a :class:`ShardedBatchDataset` and its DataLoader; the position is state.

    Iterating yields the rest of the current epoch and then moves to the next epoch. The
    position is ``(epoch, batches_in_epoch)``: batches handed to the consumer so far, counted
    when handed out. A loader restored from :meth:`state_dict` yields exactly the batches not
    yet handed out, in the same order (same world size, workers, batch size and seed).

    Args:
        dataset: the sharded dataset (one rank).
        num_workers: DataLoader worker processes.
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: see :func:`build_dataloader`.
    """

    def __init__(
        self,
        dataset: ShardedBatchDataset,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: Optional[bool] = None,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batches_in_epoch = 0

    @classmethod
    def from_config(
        cls,
        path: str,
        data: DataConfig,
        split: str = "train",
        pad_to_equal_batches: Optional[bool] = None,
        shuffle: Optional[bool] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        schema: Optional[DatasetSchema] = None,
    ) -> "ResumableLoader":
        """Builds a loader from a :class:`mtfm_rec.data.config.DataConfig`.

        Args:
            path: aggregated dataset directory.
            data: the DataConfig (``eval_after``, ``valid_after``, ``loader``).
            split: which exposures to serve.
            pad_to_equal_batches: defaults to ``split != "train"`` (evaluation mode).
            shuffle: defaults to ``split == "train"``.
            rank, world_size: default from torch.distributed.
            schema: defaults to ``<path>/dataset.yaml``.
        """
        cfg = data.loader
        if pad_to_equal_batches is None:
            pad_to_equal_batches = split != "train"
        dataset = ShardedBatchDataset(
            path,
            batch_size=cfg.batch_size,
            split=split,
            schema=schema,
            eval_after=data.eval_after,
            valid_after=data.valid_after,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            pad_to_equal_batches=pad_to_equal_batches,
            index_cache_dir=cfg.index_cache_dir,
        )
        return cls(dataset, cfg.num_workers, cfg.prefetch_factor, cfg.pin_memory)

    def num_batches(self) -> int:
        """Batches per epoch on this rank (equal on all ranks)."""
        return self.dataset.num_batches()

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of ``epoch`` (its own deterministic shuffle)."""
        self.epoch, self.batches_in_epoch = epoch, 0

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[Batch]:
        """Yields the remaining batches of the current epoch, then advances the epoch."""
        n = self.num_batches()
        if self.batches_in_epoch < n:
            self.dataset.epoch = self.epoch
            self.dataset.start_batch = self.batches_in_epoch
            loader = build_dataloader(self.dataset, self.num_workers, self.prefetch_factor, self.pin_memory)
            for batch in loader:
                self.batches_in_epoch += 1  # counted before the consumer sees it
                yield batch
            if self.batches_in_epoch != n:
                raise RuntimeError(
                    f"loader yielded {self.batches_in_epoch} batches in epoch {self.epoch}, expected {n}"
                )
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def iter_batches(self, num_epochs: Optional[int] = None) -> Iterator[Batch]:
        """Yields batches across epochs (forever when ``num_epochs`` is None)."""
        last = None if num_epochs is None else self.epoch + num_epochs
        while last is None or self.epoch < last:
            if self.num_batches() == 0:
                return
            yield from self

    # ---------------------------------------------------------------- state
    def _identity_fields(self) -> Dict[str, Any]:
        ds = self.dataset
        return {
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": self.num_workers,
            "batch_size": ds.batch_size,
            "split": ds.split,
            "shuffle": ds.shuffle,
            "shuffle_buffer": ds.shuffle_buffer,
            "seed": ds.seed,
            "pad_to_equal_batches": ds.pad_to_equal_batches,
            "num_samples": ds.num_samples,
        }

    def state_dict(self) -> Dict[str, Any]:
        """The position: epoch, batches consumed in it, and what they mean per worker stream."""
        streams = max(1, self.num_workers)
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "stream_batches": consumed_per_stream(self.batches_in_epoch, streams),
            **self._identity_fields(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a position; refuses a state whose sample order would differ.

        A state carrying ``resharded_from`` (the saving world size, as written by
        ``mtfm_rec.training.checkpoint.default_reshard_rank_states``) may come from another
        world size, rank, worker count or batch size: the loader then resumes the same epoch at
        the same fraction of it (global samples consumed), which is approximate, not exact.
        """
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')}, expected {STATE_VERSION}")
        mine = self._identity_fields()
        resharded = state.get("resharded_from")
        if resharded is not None:
            for key in ("rank", "world_size", "num_workers", "batch_size"):
                mine.pop(key)
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise LoaderError(f"loader state does not match this loader (saved, now): {diff}")
        if resharded is not None:
            old_batch = int(state.get("batch_size", self.dataset.batch_size))
            samples = int(state["batches_in_epoch"]) * old_batch * int(resharded)
            per_step = self.dataset.world_size * self.dataset.batch_size
            self.epoch = int(state["epoch"])
            self.batches_in_epoch = min(samples // per_step, self.num_batches())
            return
        if not 0 <= state["batches_in_epoch"] <= self.num_batches():
            raise LoaderError(f"batches_in_epoch {state['batches_in_epoch']} out of range")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
