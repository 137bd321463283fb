"""One rank's batches of an aggregated dataset: the stream plan and the :class:`ShardedBatchDataset`.

Each epoch the units (:mod:`mtfm_rec.data.shard_index`) are permuted and their samples laid end
to end as one global sequence; a rank takes a contiguous range of it, split into contiguous
blocks of batches, one per DataLoader worker stream; each stream shuffles its block through a
seeded shuffle buffer over sample indices and reads only the row groups it still needs. The
scheme in full is in :mod:`mtfm_rec.data.loader` and docs/LOADER.md;
:class:`mtfm_rec.data.loader.ResumableLoader` drives this dataset and owns the position.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.utils.data

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.errors import LoaderError
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.shard_index import Unit, build_index, read_unit, unreadable_shard
from mtfm_rec.data.splits import SPLITS, split_masks
from mtfm_rec.training.distributed import get_rank, get_world_size


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
    rank) are read when iteration starts; :class:`mtfm_rec.data.loader.ResumableLoader` sets
    them. Iterate it through a DataLoader with ``batch_size=None`` (see
    :func:`mtfm_rec.data.loader.build_dataloader`).

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
        scenarios: serve only these scenarios' exposures (``data.scenarios``; all when empty):
            samples without one are skipped. Unknown names are refused.
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
        scenarios: Sequence[str] = (),
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
        self.scenarios = tuple(scenarios)
        known = [sc.name for sc in self.schema.scenarios]
        unknown = [name for name in self.scenarios if name not in known]
        if unknown:
            raise LoaderError(f"data.scenarios: unknown scenario(s) {unknown}; the dataset has {known}")
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.pad_to_equal_batches = pad_to_equal_batches
        self.epoch = 0
        self.start_batch = 0

        fs, root = fsspec.core.url_to_fs(path)
        self._fs = fs
        self.units: List[Unit] = build_index(
            fs,
            root.rstrip("/"),
            self.schema,
            split,
            eval_after,
            valid_after,
            require_success,
            index_cache_dir,
            self.scenarios,
        )
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
            if len(chunks) > 1:
                # one live table: a batch is then one take from one chunk (the loader measured
                # 5.7-6.8 against 7.1-7.2 ms per batch with up to 16 live chunks), and the copy
                # happens once per row group read, not once per batch
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
        (cid,) = chunks  # the stream compacts the held rows into one live table before a batch
        rows = [held.pop(int(p))[1] for p in out]
        table = chunks[cid].take(pa.array(rows, pa.int64()))  # in the shuffled order
        refs[cid] -= len(rows)
        if refs[cid] == 0:
            del chunks[cid], refs[cid]
        _, exposure_keep = split_masks(
            table, self.schema, self.split, self.eval_after, self.valid_after, self.scenarios
        )
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
                table = read_unit(pq.ParquetFile(fh), u.path, u.row_group, u.num_rows, self._columns)
        except (pa.ArrowException, OSError) as exc:
            raise unreadable_shard(u.path, u.row_group, exc) from exc
        row_keep, _ = split_masks(table, ds.schema, ds.split, ds.eval_after, ds.valid_after, ds.scenarios)
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
