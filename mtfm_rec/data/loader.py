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

Where each part lives: the split rules in :mod:`mtfm_rec.data.splits`; the units, their counts
and the count cache in :mod:`mtfm_rec.data.shard_index`; the plan, the shuffle buffer and the
reading of one rank's batches in :mod:`mtfm_rec.data.sharded_dataset`; here, the DataLoader
around it and the position as state.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Protocol

import torch
import torch.utils.data

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.config import DataConfig
from mtfm_rec.data.errors import LoaderError
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.sharded_dataset import ShardedBatchDataset, consumed_per_stream

STATE_VERSION = 1


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


class EpochLoader(Protocol):
    """A loader whose iteration yields the rest of its current epoch and then advances it."""

    epoch: int

    def num_batches(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


def iter_epochs(loader: EpochLoader, num_epochs: Optional[int] = None) -> Iterator[Batch]:
    """Yields ``loader``'s batches across epochs (forever when ``num_epochs`` is None); stops
    at once when an epoch has no batches."""
    last = None if num_epochs is None else loader.epoch + num_epochs
    while last is None or loader.epoch < last:
        if loader.num_batches() == 0:
            return
        yield from loader


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
            data: the DataConfig (``eval_after``, ``valid_after``, ``scenarios``, ``loader``).
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
            scenarios=data.scenarios,
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
        return iter_epochs(self, num_epochs)

    # ---------------------------------------------------------------- state
    def _identity_fields(self) -> Dict[str, Any]:
        ds = self.dataset
        return {
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": self.num_workers,
            "batch_size": ds.batch_size,
            "split": ds.split,
            "scenarios": list(ds.scenarios),
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
        if "source_names" in state:  # a mixture's (mtfm_rec.data.mixture)
            raise LoaderError(
                f"loader state of a run with extra passes (sources {state['source_names']}); "
                "this run has none (data.loader.extra_passes changed since it was saved)"
            )
        mine = self._identity_fields()
        resharded = state.get("resharded_from")
        if resharded is not None:
            for key in ("rank", "world_size", "num_workers", "batch_size"):
                mine.pop(key)
        # states written before data.scenarios existed served every scenario
        state = {"scenarios": [], **state}
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
