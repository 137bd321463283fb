"""Extra passes over a sparse scenario: one training epoch interleaves several loaders.

A sparse scenario learns its own tables from few exposures; weighting its loss does not give
the rows of its own tables more or larger updates (the tables' Adagrad, or Adam on GPUs, divides
a constant weight out), but showing its samples more often does.
``data.loader.extra_passes={coupon: 1}`` adds, to every training epoch, one more pass over the
samples that hold a ``coupon`` exposure, in batches that carry only that scenario's exposures
(the sequences whole, the other scenarios' exposures left out, so feed and search are not
trained twice):

    epoch e:  main batches   m m m m m m m m m m   (every scenario, as without extra passes)
              coupon batches     c         c       (only coupon exposures)
              schedule       m m c m m m m c m m   (each source's batch k at time (k + 1/2) / n)

The schedule depends only on the sources' batch counts, which every rank computes alike, so all
ranks take the same source at the same step, and the position is one number, as for
:class:`mtfm_rec.data.loader.ResumableLoader`: ``(epoch, batches_in_epoch)`` fixes how many
batches each source has handed out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.config import DataConfig
from mtfm_rec.data.errors import LoaderError
from mtfm_rec.data.loader import ResumableLoader, iter_epochs
from mtfm_rec.data.schema import DatasetSchema

STATE_VERSION = 1


def interleave_schedule(counts: Sequence[int]) -> np.ndarray:
    """Source index of every position of an epoch that takes ``counts[j]`` batches of source
    ``j``, spread evenly: batch ``k`` of source ``j`` sits at time ``(k + 1/2) / counts[j]``
    (ties go to the lower source). ``[3, 1]`` gives ``[0, 0, 1, 0]``."""
    if sum(counts) == 0:
        return np.zeros(0, np.int64)
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
    sources = np.concatenate([np.full(n, j, np.int64) for j, n in enumerate(counts)])
    return sources[np.lexsort((sources, times))]


class MixtureLoader:
    """Interleaves the batches of several :class:`ResumableLoader` sources within each epoch.

    Iterating yields the rest of the current epoch (every source's batches of that epoch, in
    :func:`interleave_schedule` order) and then moves to the next epoch, as ``ResumableLoader``
    does; every source runs the mixture's epoch number, so each keeps its own deterministic
    shuffle. ``state_dict`` / ``load_state_dict`` restore the exact position.

    Args:
        sources: ``(name, loader)`` pairs, the main loader first (names appear in states and
            messages: ``main``, then the scenario of each extra pass).
    """

    def __init__(self, sources: Sequence[Tuple[str, ResumableLoader]]) -> None:
        if not sources:
            raise LoaderError("MixtureLoader needs at least one source")
        self.sources: List[Tuple[str, ResumableLoader]] = list(sources)
        self.dataset = sources[0][1].dataset  # what the trainer's messages read (num_samples)
        self._schedule = interleave_schedule([loader.num_batches() for _, loader in self.sources])
        self.epoch = 0
        self.batches_in_epoch = 0

    def num_batches(self) -> int:
        """Batches per epoch on this rank: the sum of the sources' (equal on all ranks)."""
        return len(self._schedule)

    def __len__(self) -> int:
        return self.num_batches()

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of ``epoch``."""
        self.epoch, self.batches_in_epoch = epoch, 0

    def _consumed(self, position: int) -> np.ndarray:
        """Batches each source has handed out in the first ``position`` batches of an epoch."""
        return np.bincount(self._schedule[:position], minlength=len(self.sources))

    def __iter__(self) -> Iterator[Batch]:
        """Yields the remaining batches of the current epoch, then advances the epoch."""
        start = self.batches_in_epoch
        streams: List[Iterator[Batch]] = []
        for (_, loader), done in zip(self.sources, self._consumed(start)):
            loader.epoch, loader.batches_in_epoch = self.epoch, int(done)
            streams.append(iter(loader))
        for source in self._schedule[start:].tolist():
            batch = next(streams[source], None)
            if batch is None:
                name = self.sources[source][0]
                raise RuntimeError(f"mixture source {name!r} ran out of batches in epoch {self.epoch}")
            self.batches_in_epoch += 1  # counted before the consumer sees it
            yield batch
        for (name, _), stream in zip(self.sources, streams):
            # ends the source's generator, which checks its count and advances its own epoch
            if next(stream, None) is not None:
                raise RuntimeError(
                    f"mixture source {name!r} yielded more batches than its count in epoch {self.epoch}"
                )
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def iter_batches(self, num_epochs: Optional[int] = None) -> Iterator[Batch]:
        """Yields batches across epochs (forever when ``num_epochs`` is None)."""
        return iter_epochs(self, num_epochs)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """The position, and each source's identity (its order-defining fields)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "source_names": [name for name, _ in self.sources],
            "source_batches": [loader.num_batches() for _, loader in self.sources],
            "sources": [_identity(loader) for _, loader in self.sources],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a position; refuses a state of other sources.

        A resharded state (``resharded_from``, another world size) resumes the same epoch at
        the same fraction of it, which is approximate, as for a single loader.
        """
        if state.get("version") != STATE_VERSION or "source_names" not in state:
            raise LoaderError(
                "loader state is not a mixture state of version "
                f"{STATE_VERSION} (data.loader.extra_passes changed since it was saved?)"
            )
        names = [name for name, _ in self.sources]
        if list(state["source_names"]) != names:
            raise LoaderError(
                f"loader state has the sources {list(state['source_names'])}, this loader {names} "
                "(data.loader.extra_passes changed since it was saved)"
            )
        if state.get("resharded_from") is not None:
            fraction = int(state["batches_in_epoch"]) / max(1, sum(state["source_batches"]))
            self.epoch = int(state["epoch"])
            self.batches_in_epoch = min(int(fraction * self.num_batches()), self.num_batches())
            return
        for (name, loader), saved in zip(self.sources, state["sources"]):
            mine = _identity(loader)
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            if diff:
                raise LoaderError(f"loader state of source {name!r} does not match (saved, now): {diff}")
        if not 0 <= int(state["batches_in_epoch"]) <= self.num_batches():
            raise LoaderError(f"batches_in_epoch {state['batches_in_epoch']} out of range")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


def _identity(loader: ResumableLoader) -> Dict[str, Any]:
    state = loader.state_dict()
    return {k: v for k, v in state.items() if k not in ("epoch", "batches_in_epoch", "stream_batches")}


def train_loader_from_config(
    path: str,
    data: DataConfig,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    schema: Optional[DatasetSchema] = None,
) -> Union[ResumableLoader, "MixtureLoader"]:
    """The training loader of ``data``: a :class:`ResumableLoader`, or a :class:`MixtureLoader`
    of it and the extra passes of ``data.loader.extra_passes``.

    Raises:
        LoaderError: an extra pass names a scenario the dataset lacks or ``data.scenarios`` leaves out.
    """
    main = ResumableLoader.from_config(path, data, "train", rank=rank, world_size=world_size, schema=schema)
    passes = {name: n for name, n in sorted(data.loader.extra_passes.items()) if n > 0}
    if not passes:
        return main
    known = [sc.name for sc in main.dataset.schema.scenarios]
    served = list(data.scenarios) or known
    for name in passes:
        if name not in served:
            raise LoaderError(
                f"data.loader.extra_passes: scenario {name!r} is not trained "
                f"(the dataset has {known}; data.scenarios={list(data.scenarios)})"
            )
    sources: List[Tuple[str, ResumableLoader]] = [("main", main)]
    for name, n in passes.items():
        for i in range(n):
            # each pass its own shuffle: the seed of the main pass plus the pass number
            loader_cfg = dataclasses.replace(data.loader, seed=data.loader.seed + i + 1)
            only = dataclasses.replace(data, scenarios=[name], loader=loader_cfg)
            extra = ResumableLoader.from_config(
                path, only, "train", rank=rank, world_size=world_size, schema=main.dataset.schema
            )
            sources.append((f"{name}#{i + 1}", extra))
    return MixtureLoader(sources)
