"""Exact distributed AUC, GAUC and logloss per scenario x task.

Every metric is computed from *all* evaluated exposures of *all* ranks, never averaged over
ranks. :class:`MetricAccumulator` keeps each rank's predictions exactly (float32 scores, int8
labels, int64 user ids and timestamps) and :meth:`MetricAccumulator.compute` gathers them on
rank 0, which computes the metrics and broadcasts them back.

Definitions (per key ``"<scenario>/<task>"``, over the exposures whose label is present):

* ``auc``: the Mann-Whitney statistic with average ranks for ties,
  ``(R_pos - P (P + 1) / 2) / (P N)`` where ``R_pos`` is the sum of the 1-based ranks of the
  positives among all scores, ``P``/``N`` the positive/negative counts. Equals the probability
  that a random positive scores above a random negative, ties counting one half. NaN when
  ``P == 0`` or ``N == 0``.
* ``gauc``: ``sum_u n_u AUC_u / sum_u n_u`` over users ``u`` having at least one positive and
  one negative exposure for this key, with ``n_u`` the user's exposure count for the key and
  ``AUC_u`` the AUC above restricted to the user's exposures. NaN when no user qualifies.
* ``logloss``: mean of ``-(y log p + (1 - y) log(1 - p))``, ``p`` clipped to
  ``[1e-7, 1 - 1e-7]``, in float64.
* ``count``: number of exposures with a label; ``gauc_users``: number of users in GAUC.

A non-finite score or label (NaN, +-inf) has no rank and no loss: instead of a number, every
entry point raises :class:`NonFiniteError` naming the scenario/task and how many values were
not finite. :meth:`MetricAccumulator.compute` checks after the gather, on rank 0, and
broadcasts the outcome, so every rank raises the same error (none is left waiting).

The computation sorts the rows canonically (by user, score, label) before any floating-point
sum, so the result depends only on the multiset of rows: a 2-rank run equals a 1-process run
bit for bit, and :func:`metrics_from_predictions` on the written ``predictions.parquet`` equals
``metrics.json``.

Why one module of ~570 lines: the definitions, the exact kernels, the rank-gathering accumulator
and the predictions round trip implement one contract (a metric equals the same metric
recomputed from ``predictions.parquet``, on any number of ranks); they change together.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.training.distributed import broadcast_from_rank0, gather_to_rank0, get_world_size

if TYPE_CHECKING:  # for the annotation only: the metrics never build a batch, nor import torchrec
    from mtfm_rec.data.batch import Batch

LOGLOSS_EPS = 1e-7
PREDICTION_COLUMNS = ("scenario", "task", "user_id", "ts", "label", "score")
# Parquet schema metadata key holding the JSON list of evaluated keys, so keys without any
# labelled exposure survive the round trip through predictions.parquet.
_KEYS_METADATA = b"mtfm_rec.metric_keys"

MetricDict = Dict[str, Dict[str, float]]
# Stored int8 label of an exposure whose label was not finite: never a 0 or 1, refused by the
# metrics (see _binary_labels).
NON_FINITE_LABEL = -1


class NonFiniteError(FloatingPointError):
    """A NaN or infinity where training or evaluation needs a number: a training loss (the
    run diverged) or a prediction score or label that metrics would otherwise rank or sum."""


def _binary_labels(values: np.ndarray) -> np.ndarray:
    """0/1 int8 labels (``> 0.5``), :data:`NON_FINITE_LABEL` where the value is not finite."""
    values = np.asarray(values)
    out = (values > 0.5).astype(np.int8)
    if values.dtype.kind == "f":
        out[~np.isfinite(values)] = NON_FINITE_LABEL
    return out


def _count_non_finite(scores: np.ndarray, labels: np.ndarray) -> Tuple[int, int]:
    """(non-finite scores, non-finite labels); int labels count :data:`NON_FINITE_LABEL`."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    bad_scores = int(np.count_nonzero(~np.isfinite(scores))) if scores.dtype.kind == "f" else 0
    if labels.dtype.kind == "f":
        bad_labels = int(np.count_nonzero(~np.isfinite(labels)))
    else:
        bad_labels = int(np.count_nonzero(labels == NON_FINITE_LABEL))
    return bad_scores, bad_labels


def non_finite_report(
    rows: Mapping[str, Mapping[str, np.ndarray]], keys: Optional[Sequence[str]] = None
) -> Optional[str]:
    """What :class:`NonFiniteError` would say about these rows, or None when all are finite.

    Args:
        rows: ``{"<scenario>/<task>": {"score", "label", ...}}``.
        keys: the keys to check (default: all of ``rows``).
    """
    problems = []
    for key in keys if keys is not None else list(rows):
        r = rows.get(key)
        if r is None:
            continue
        bad_scores, bad_labels = _count_non_finite(r["score"], r["label"])
        if bad_scores or bad_labels:
            problems.append(
                f"scenario/task {key}: {bad_scores} of {len(r['score'])} scores and {bad_labels} labels"
                " not finite"
            )
    if not problems:
        return None
    return "AUC/GAUC/logloss are not computed over NaN or infinite values: " + "; ".join(problems)


# ---------------------------------------------------------------------------- exact kernels
def _sorted_groups(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows in canonical order (group, score, label); returns (scores, labels, groups) sorted."""
    order = np.lexsort((labels, scores, groups))
    return scores[order], labels[order], groups[order]


def _grouped_auc(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group AUC with average-rank ties, on rows already in canonical order.

    Args:
        scores: [n] float32, sorted by (groups, scores).
        labels: [n] int8 in {0, 1}.
        groups: [n] int64 dense group ids 0..G-1, sorted ascending.

    Returns:
        (auc [G] float64, NaN where a group lacks a class; size [G] int64; positives [G] int64).
    """
    n = len(scores)
    num_groups = int(groups[-1]) + 1 if n else 0
    size = np.bincount(groups, minlength=num_groups).astype(np.int64)
    pos = np.bincount(groups, weights=labels, minlength=num_groups).round().astype(np.int64)
    if n == 0:
        return np.zeros(0), size, pos
    # Runs of equal (group, score) are tie blocks; each row gets the block's average rank.
    new_block = np.empty(n, dtype=bool)
    new_block[0] = True
    new_block[1:] = (groups[1:] != groups[:-1]) | (scores[1:] != scores[:-1])
    block_start = np.flatnonzero(new_block)
    block_end = np.append(block_start[1:], n)  # exclusive
    group_start = np.concatenate([[0], np.cumsum(size)[:-1]])
    block_group = groups[block_start]
    # 1-based ranks inside the group: positions block_start..block_end-1 -> mean + 1.
    block_rank = (block_start + block_end - 1) / 2.0 - group_start[block_group] + 1.0
    block_pos = np.add.reduceat(labels.astype(np.int64), block_start)
    # Half-integer ranks times integer counts: exact in float64 below 2**52.
    rank_sum = np.bincount(block_group, weights=block_rank * block_pos, minlength=num_groups)
    neg = size - pos
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - pos * (pos + 1) / 2.0) / (pos.astype(np.float64) * neg)
    auc[(pos == 0) | (neg == 0)] = np.nan
    return auc, size, pos


def _logloss(scores: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(scores.astype(np.float64), LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    loss = -np.where(labels > 0, np.log(p), np.log1p(-p))
    return float(loss.sum() / len(loss))


def compute_key_metrics(
    scores: np.ndarray, labels: np.ndarray, user_id: np.ndarray, key: str = "(unnamed)"
) -> Dict[str, float]:
    """AUC, GAUC, logloss and counts of one scenario x task from its labelled rows.

    Args:
        scores: [n] predicted probabilities.
        labels: [n] 0/1 labels.
        user_id: [n] the user of each row (GAUC groups).
        key: the ``"<scenario>/<task>"`` the rows are of, for error messages.

    Returns:
        ``{"auc", "gauc", "logloss", "count", "gauc_users"}``; NaN for undefined metrics.

    Raises:
        NonFiniteError: a score or label is NaN or infinite.
    """
    scores = np.asarray(scores, dtype=np.float32)  # checked as float32: no overflow after the check
    problem = non_finite_report({key: {"score": scores, "label": labels}})
    if problem is not None:
        raise NonFiniteError(problem)
    labels = np.asarray(labels).astype(np.int8)
    user_id = np.asarray(user_id, dtype=np.int64)
    n = len(scores)
    if n == 0:
        nan = float("nan")
        return {"auc": nan, "gauc": nan, "logloss": nan, "count": 0, "gauc_users": 0}
    _, dense_user = np.unique(user_id, return_inverse=True)
    s, y, g = _sorted_groups(scores, labels, dense_user.astype(np.int64))
    user_auc, user_size, _ = _grouped_auc(s, y, g)
    # Global AUC: the same kernel with one group; the canonical order is re-derived so the
    # sums never depend on the input row order.
    s0, y0, g0 = _sorted_groups(scores, labels, np.zeros(n, np.int64))
    auc = _grouped_auc(s0, y0, g0)[0][0]
    valid = ~np.isnan(user_auc)
    weight = user_size[valid].astype(np.float64)
    gauc = float((user_auc[valid] * weight).sum() / weight.sum()) if valid.any() else float("nan")
    return {
        "auc": float(auc),
        "gauc": gauc,
        "logloss": _logloss(s, y),
        "count": int(n),
        "gauc_users": int(valid.sum()),
    }


# ---------------------------------------------------------------------------- row storage
@dataclass
class _Rows:
    """Exact, compact rows of one key: lists of numpy chunks, concatenated on demand."""

    score: List[np.ndarray] = field(default_factory=list)  # float32
    label: List[np.ndarray] = field(default_factory=list)  # int8
    user_id: List[np.ndarray] = field(default_factory=list)  # int64
    ts: List[np.ndarray] = field(default_factory=list)  # int64, -1 when not tracked

    def append(self, score: np.ndarray, label: np.ndarray, user: np.ndarray, ts: np.ndarray) -> None:
        self.score.append(score)
        self.label.append(label)
        self.user_id.append(user)
        self.ts.append(ts)

    def arrays(self) -> Dict[str, np.ndarray]:
        def cat(chunks: List[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)

        out = {
            "score": cat(self.score, np.float32),
            "label": cat(self.label, np.int8),
            "user_id": cat(self.user_id, np.int64),
            "ts": cat(self.ts, np.int64),
        }
        # Keep one chunk so repeated calls do not re-concatenate.
        self.score, self.label = [out["score"]], [out["label"]]
        self.user_id, self.ts = [out["user_id"]], [out["ts"]]
        return out


def metric_keys(schema: DatasetSchema) -> List[str]:
    """``"<scenario>/<task>"`` for every scenario and task, in schema order."""
    return [f"{s.name}/{t}" for s in schema.scenarios for t in s.tasks]


def metrics_from_arrays(
    rows: Mapping[str, Mapping[str, np.ndarray]], keys: Optional[Sequence[str]] = None
) -> MetricDict:
    """Metrics of every key from its rows (``{"score", "label", "user_id"}`` arrays).

    Raises:
        NonFiniteError: naming every key with a NaN or infinite score or label.
    """
    keys = list(keys) if keys is not None else list(rows)
    problem = non_finite_report(rows, keys)
    if problem is not None:
        raise NonFiniteError(problem)
    empty: Mapping[str, np.ndarray] = {
        "score": np.zeros(0, np.float32),
        "label": np.zeros(0, np.int8),
        "user_id": np.zeros(0, np.int64),
    }
    return {
        k: compute_key_metrics(r["score"], r["label"], r["user_id"], key=k)
        for k in keys
        for r in (rows.get(k, empty),)
    }


# ---------------------------------------------------------------------------- accumulator
class MetricAccumulator:
    """Accumulates predictions per scenario x task and computes exact metrics over all ranks.

    ``update`` only appends detached device tensors (no host synchronisation); every
    ``flush_every`` updates, and at ``compute``, the pending tensors move to the host once and
    are compacted to the labelled rows as numpy arrays (float32 score, int8 label, int64 user
    and ts: 21 bytes per labelled exposure). Memory is thus O(evaluated exposures) on the host
    plus at most ``flush_every`` batches on the device. A label that is not finite is stored as
    :data:`NON_FINITE_LABEL`, so ``compute`` refuses it instead of reading it as a 0.

    Example::

        acc = MetricAccumulator(schema, save_predictions=True)
        for batch in loader:
            acc.update_batch(batch, {s: torch.sigmoid(logits[s]) for s in logits})
        metrics = acc.compute(predictions_path=f"{run_dir}/predictions.parquet")
        if rank == 0:
            write_metrics_json(f"{run_dir}/metrics.json", metrics)

    Args:
        keys: a schema (all scenarios x tasks) or a list of ``"<scenario>/<task>"``.
        save_predictions: keep each row's timestamp too, for ``predictions.parquet``.
        flush_every: updates between moves of pending tensors to the host.
    """

    def __init__(
        self,
        keys: Union[DatasetSchema, Sequence[str]],
        save_predictions: bool = False,
        flush_every: int = 64,
    ) -> None:
        self.keys: List[str] = metric_keys(keys) if isinstance(keys, DatasetSchema) else list(keys)
        self.tasks: Dict[str, List[str]] = {}
        for key in self.keys:
            scenario, _, task = key.partition("/")
            if not task:
                raise ValueError(f"metric key {key!r} is not '<scenario>/<task>'")
            self.tasks.setdefault(scenario, []).append(task)
        self.save_predictions = save_predictions
        self.flush_every = max(1, flush_every)
        self._pending: List[
            Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
        ] = []
        self._rows: Dict[str, _Rows] = {k: _Rows() for k in self.keys}

    def reset(self) -> None:
        self._pending.clear()
        self._rows = {k: _Rows() for k in self.keys}

    def update(
        self,
        scenario: str,
        scores: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        user_id: torch.Tensor,
        ts: Optional[torch.Tensor] = None,
    ) -> None:
        """Adds one scenario's exposures of a batch.

        Args:
            scenario: scenario name; its tasks are the columns, in the order given at
                construction (schema order for a schema).
            scores: [n, T] predicted probabilities.
            labels: [n, T] 0/1 labels.
            mask: [n, T] bool, True where the label is present (others are ignored).
            user_id: [n] user of each exposure.
            ts: [n] exposure timestamps (kept only with ``save_predictions``).
        """
        if scenario not in self.tasks:
            raise KeyError(f"scenario {scenario!r} not among metric keys {self.keys}")
        num_tasks = len(self.tasks[scenario])
        if scores.dim() != 2 or scores.shape[1] != num_tasks:
            raise ValueError(f"{scenario}: scores must be [n, {num_tasks}], got {tuple(scores.shape)}")
        self._pending.append(
            (
                scenario,
                scores.detach(),
                labels.detach(),
                mask.detach(),
                user_id.detach(),
                ts.detach() if (ts is not None and self.save_predictions) else None,
            )
        )
        if len(self._pending) >= self.flush_every:
            self.flush()

    def update_batch(self, batch: Batch, scores: Mapping[str, torch.Tensor]) -> None:
        """Adds every scenario of a :class:`~mtfm_rec.data.batch.Batch`.

        Args:
            batch: the evaluated batch (labels, label_mask, user_id, exposure_sample, token_ts).
            scores: scenario -> [n_s, n_tasks] probabilities, rows in the batch's KJT order.
        """
        for scenario, s in scores.items():
            sample = batch.exposure_sample[scenario]
            ts = batch.token_ts[batch.target_positions[scenario]] if self.save_predictions else None
            self.update(
                scenario, s, batch.labels[scenario], batch.label_mask[scenario], batch.user_id[sample], ts
            )

    def flush(self) -> None:
        """Moves pending tensors to the host and keeps only labelled rows, compactly."""
        for scenario, scores, labels, mask, user, ts in self._pending:
            scores_np = scores.float().cpu().numpy()
            labels_np = labels.cpu().numpy()
            mask_np = mask.bool().cpu().numpy()
            user_np = user.long().cpu().numpy()
            ts_np = ts.long().cpu().numpy() if ts is not None else None
            for t, task in enumerate(self.tasks[scenario]):
                keep = mask_np[:, t]
                self._rows[f"{scenario}/{task}"].append(
                    scores_np[keep, t].astype(np.float32),
                    _binary_labels(labels_np[keep, t]),
                    user_np[keep],
                    ts_np[keep] if ts_np is not None else np.full(int(keep.sum()), -1, np.int64),
                )
        self._pending.clear()

    def local_rows(self) -> Dict[str, Dict[str, np.ndarray]]:
        """This rank's labelled rows per key (score, label, user_id, ts arrays)."""
        self.flush()
        return {k: self._rows[k].arrays() for k in self.keys}

    def gather(
        self, process_group: Optional[dist.ProcessGroup] = None
    ) -> Optional[Dict[str, Dict[str, np.ndarray]]]:
        """All ranks' rows, concatenated in rank order, on rank 0 (None on other ranks).

        Collective over ``process_group`` when torch.distributed is initialised.
        """
        local = self.local_rows()
        if not _distributed(process_group):
            return local
        parts = gather_to_rank0(local, process_group)
        if parts is None:
            return None
        return {
            k: {c: np.concatenate([p[k][c] for p in parts if p is not None]) for c in local[k]}
            for k in self.keys
        }

    def compute(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        predictions_path: Optional[str] = None,
    ) -> MetricDict:
        """Exact metrics over all ranks' rows; the same dict is returned on every rank.

        Args:
            process_group: the group to gather over (default: the world, if initialised).
            predictions_path: if given, rank 0 writes the gathered rows there as parquet
                (columns scenario, task, user_id, ts, label, score).

        Returns:
            ``{"<scenario>/<task>": {"auc", "gauc", "logloss", "count", "gauc_users"}}``.

        Raises:
            NonFiniteError: on every rank, when any rank had a NaN or infinite score or label
                (nothing is written to ``predictions_path`` then).
            Exception: any other failure on rank 0 (e.g. writing ``predictions_path``) is raised
                there as it was, and on the other ranks as a ``RuntimeError`` naming it.
        """
        rows = self.gather(process_group)
        metrics: Optional[MetricDict] = None
        failure: Optional[Tuple[str, str]] = None  # (error class name, message) from rank 0
        own: Optional[Exception] = None  # rank 0's exception itself, re-raised there as it was
        if rows is not None:
            # Rank 0 alone computes; an error there must reach the others, who would otherwise
            # wait in the broadcast below forever.
            try:
                metrics = metrics_from_arrays(rows, self.keys)  # refuses non-finite rows before any write
                if predictions_path is not None:
                    write_predictions(predictions_path, rows, self.keys)
            except Exception as exc:
                if not _distributed(process_group):
                    raise
                own, failure = exc, (type(exc).__name__, str(exc))
        metrics, failure = broadcast_from_rank0([metrics, failure], process_group)
        if own is not None:  # after the broadcast, so the other ranks are not left waiting
            raise own
        if failure is not None:
            name, message = failure
            if name == NonFiniteError.__name__:
                raise NonFiniteError(message)
            raise RuntimeError(f"computing metrics failed on rank 0: {name}: {message}")
        assert metrics is not None
        return metrics


def _distributed(process_group: Optional[dist.ProcessGroup]) -> bool:
    """More than one rank to gather from or agree with."""
    return get_world_size(process_group) > 1


# ---------------------------------------------------------------------------- predictions I/O
def predictions_table(
    rows: Mapping[str, Mapping[str, np.ndarray]], keys: Optional[Sequence[str]] = None
) -> pa.Table:
    """Rows per key -> one table (scenario, task, user_id, ts, label, score), keys in order."""
    keys = list(keys) if keys is not None else list(rows)
    scen: List[np.ndarray] = []
    task: List[np.ndarray] = []
    cols: Dict[str, List[np.ndarray]] = {c: [] for c in ("user_id", "ts", "label", "score")}
    for key in keys:
        r = rows.get(key)
        if r is None:
            continue
        n = len(r["score"])
        s, _, t = key.partition("/")
        scen.append(np.full(n, s, dtype=object))
        task.append(np.full(n, t, dtype=object))
        for c in cols:
            cols[c].append(r[c] if c in r else np.full(n, -1, np.int64))
    dtypes = {"user_id": pa.int64(), "ts": pa.int64(), "label": pa.int8(), "score": pa.float32()}
    arrays = [
        pa.array(np.concatenate(scen) if scen else np.zeros(0, object), pa.string()),
        pa.array(np.concatenate(task) if task else np.zeros(0, object), pa.string()),
    ] + [pa.array(np.concatenate(cols[c]) if cols[c] else np.zeros(0), dtypes[c]) for c in cols]
    table = pa.Table.from_arrays(arrays, names=list(PREDICTION_COLUMNS))
    return table.replace_schema_metadata({_KEYS_METADATA: json.dumps(keys).encode()})


def write_predictions(
    path: str, rows: Mapping[str, Mapping[str, np.ndarray]], keys: Optional[Sequence[str]] = None
) -> None:
    """Writes rows as parquet, atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    pq.write_table(predictions_table(rows, keys), tmp)
    os.replace(tmp, path)


def metrics_from_predictions(
    table: Union[pa.Table, "object", str], keys: Optional[Sequence[str]] = None
) -> MetricDict:
    """Metrics from a predictions table, by the same code as :meth:`MetricAccumulator.compute`.

    Args:
        table: a pyarrow Table, a pandas DataFrame or a parquet path with columns scenario,
            task, user_id, label, score (ts is ignored).
        keys: keys to report; default: those in the table's metadata (written by
            :func:`write_predictions`), else the (scenario, task) pairs present in order.
    """
    if isinstance(table, str):
        table = pq.read_table(table)
    if not isinstance(table, pa.Table):  # pandas
        table = pa.Table.from_pandas(table, preserve_index=False)
    if keys is None:
        meta = table.schema.metadata or {}
        keys = json.loads(meta[_KEYS_METADATA]) if _KEYS_METADATA in meta else None
    # Dictionary-encode "<scenario>/<task>" so rows are grouped without Python strings per row.
    joined = pc.binary_join_element_wise(
        table.column("scenario").cast(pa.string()), table.column("task").cast(pa.string()), "/"
    )
    encoded = joined.combine_chunks().dictionary_encode() if table.num_rows else None
    present = [str(k) for k in encoded.dictionary.to_pylist()] if encoded is not None else []
    key_index = (
        encoded.indices.to_numpy(zero_copy_only=False) if encoded is not None else np.zeros(0, np.int64)
    )
    if keys is None:
        keys = present
    score = table.column("score").to_numpy().astype(np.float32)  # a null score reads as NaN: refused
    label = _binary_labels(table.column("label").to_numpy(zero_copy_only=False).astype(np.float64))
    user = table.column("user_id").to_numpy().astype(np.int64)
    rows = {}
    for i, key in enumerate(present):
        sel = key_index == i
        rows[key] = {"score": score[sel], "label": label[sel], "user_id": user[sel]}
    return metrics_from_arrays(rows, keys)


def write_metrics_json(path: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
    """Writes metrics as JSON (NaN as null), atomically."""

    def clean(v: float) -> Optional[float]:
        return None if isinstance(v, float) and math.isnan(v) else v

    out = {k: {m: clean(v) for m, v in d.items()} for k, d in metrics.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def read_metrics_json(path: str) -> MetricDict:
    """Inverse of :func:`write_metrics_json` (null back to NaN)."""
    with open(path) as fh:
        raw = json.load(fh)
    return {k: {m: float("nan") if v is None else v for m, v in d.items()} for k, d in raw.items()}
