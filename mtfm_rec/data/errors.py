"""The errors that several modules of the data layer raise, kept apart so that none of those
modules imports another just for its error type.

* :class:`LoaderError`: the loading path (:mod:`mtfm_rec.data.splits`,
  :mod:`mtfm_rec.data.shard_index`, :mod:`mtfm_rec.data.sharded_dataset`,
  :mod:`mtfm_rec.data.loader`).
* :class:`AggregationError`: the aggregation (:mod:`mtfm_rec.data.aggregate`,
  :mod:`mtfm_rec.data.aggregate_partitions`, :mod:`mtfm_rec.data.aggregate_output`).

An error raised by one module only stays with it: ``SchemaError`` in :mod:`mtfm_rec.data.schema`,
``DataContractError`` in :mod:`mtfm_rec.data.reader`.
"""

from __future__ import annotations


class LoaderError(ValueError):
    """A dataset directory or loader state the loader cannot use; the message says why."""


class AggregationError(ValueError):
    """An aggregation that must not run as asked: an unsafe output directory, a user-window too
    large for one sample, or inputs that changed while being read. The message names the path,
    the user and window, or the file, and the way out."""
