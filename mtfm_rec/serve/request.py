"""Request-level samples: one user, one scenario, one request time, N candidates.

A request is what a ranking service receives (paper 3.1, "online inference")::

    Request(scenario="hp", ts=t, user_id=u)
      context["orders"]    ts [L_q] ascending, ids {feature: [L_q]}     H: actions before t's window
      context["clicks_rt"] ts [L_q] ascending, ids {feature: [L_q]}     R: actions before t
      features             {column: [M]}  folded single-id features of every candidate (the
                                           scenario's user features repeated, item, cross)
      bags                 {column: (offsets [M+1], ids)}  multi-hot features, jagged
      dense                [M, n_dense] float32 (raw: the model compresses them as in training)
      candidate_ts         [M] int64 (t for every candidate of an online request)

Ids are folded as training folds them (:func:`mtfm_rec.data.schema.fold_ids`): ``v mod size`` for
an id outside ``[0, size)``, ``size`` (the "missing" row) for a null.

:func:`collate_requests` pads requests of one scenario into :class:`ScenarioInputs`, the tensors
the scenario subgraph (``mtfm_rec.serve.subgraph``) and its exported program take::

    seq_ids[q]    [B, L_q, F_q] int64    per sequence (schema.ordered_sequences), padded with 0
    seq_ts[q]     [B, L_q]      int64
    seq_len[q]    [B]           int64    valid actions of each request
    cand_ids      [B, M, F_s]   int64    the scenario's categorical features (ScenarioSpec.categorical order)
    cand_bags[f]  [B, M, K_f]   int64    per multi-hot feature, padded with -1
    cand_dense    [B, M, D_s]   float32
    cand_ts       [B, M]        int64
    cand_count    [B]           int64    valid candidates of each request

:func:`requests_from_batch` cuts a training :class:`~mtfm_rec.data.batch.Batch` into requests
(one per sample, scenario and raw ``request_id``, or exposure ts where the log had no request
id), which is how replay scores an evaluation split through the serving path with exactly the
context the trainer saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec


@dataclass
class SequenceContext:
    """One behaviour sequence of a request's context: actions in ascending ts."""

    ts: np.ndarray  # [L] int64
    ids: Dict[str, np.ndarray]  # feature -> [L] folded int64

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass
class Request:
    """A request of one scenario (module docstring); every id already folded."""

    scenario: str
    ts: int
    context: Dict[str, SequenceContext]
    features: Dict[str, np.ndarray]
    dense: np.ndarray
    candidate_ts: np.ndarray
    bags: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    user_id: int = -1

    @property
    def num_candidates(self) -> int:
        return int(self.candidate_ts.shape[0])

    @property
    def context_length(self) -> int:
        return sum(len(c) for c in self.context.values())

    def take(self, index: np.ndarray) -> "Request":
        """The same request with only the candidates ``index`` (in that order)."""
        bags = {}
        for name, (offsets, ids) in self.bags.items():
            lengths = (offsets[1:] - offsets[:-1])[index]
            parts = [ids[offsets[i] : offsets[i + 1]] for i in index]
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            bags[name] = (new_offsets, np.concatenate(parts).astype(np.int64) if parts else ids[:0])
        return Request(
            scenario=self.scenario,
            ts=self.ts,
            context=self.context,
            features={k: v[index] for k, v in self.features.items()},
            dense=self.dense[index],
            candidate_ts=self.candidate_ts[index],
            bags=bags,
            user_id=self.user_id,
        )


@dataclass
class ScenarioInputs:
    """Padded tensors of B requests of one scenario (module docstring for the shapes)."""

    seq_ids: List[torch.Tensor]
    seq_ts: List[torch.Tensor]
    seq_len: List[torch.Tensor]
    cand_ids: torch.Tensor
    cand_bags: List[torch.Tensor]
    cand_dense: torch.Tensor
    cand_ts: torch.Tensor
    cand_count: torch.Tensor

    def request(self, b: int) -> "ScenarioInputs":
        """Request ``b`` alone (B = 1), its context cut to its own lengths (at least one slot,
        as :func:`collate_requests` pads); the candidates keep the batch's padding."""
        lengths = [max(1, int(n[b])) for n in self.seq_len]
        return ScenarioInputs(
            seq_ids=[ids[b : b + 1, :n] for ids, n in zip(self.seq_ids, lengths)],
            seq_ts=[ts[b : b + 1, :n] for ts, n in zip(self.seq_ts, lengths)],
            seq_len=[n[b : b + 1] for n in self.seq_len],
            cand_ids=self.cand_ids[b : b + 1],
            cand_bags=[bag[b : b + 1] for bag in self.cand_bags],
            cand_dense=self.cand_dense[b : b + 1],
            cand_ts=self.cand_ts[b : b + 1],
            cand_count=self.cand_count[b : b + 1],
        )

    def as_args(self) -> Tuple[object, ...]:
        """The positional arguments of ``ScenarioModel.forward`` (and of an exported program)."""
        return (
            self.seq_ids,
            self.seq_ts,
            self.seq_len,
            self.cand_ids,
            self.cand_bags,
            self.cand_dense,
            self.cand_ts,
            self.cand_count,
        )


def _pad_rows(parts: Sequence[np.ndarray], width: int, fill: int, dtype: type) -> np.ndarray:
    """``[len(parts), width, *rest]`` with each part's rows first, ``fill`` after."""
    rest = parts[0].shape[1:] if parts else ()
    out: np.ndarray = np.full((len(parts), width) + tuple(rest), fill, dtype=dtype)
    for i, p in enumerate(parts):
        out[i, : len(p)] = p
    return out


def _bag_matrix(offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Jagged bags -> ``[M, K]`` ids padded with -1 (K = the longest bag, at least 1)."""
    lengths = offsets[1:] - offsets[:-1]
    out = np.full((len(lengths), max(1, int(lengths.max(initial=0)))), -1, np.int64)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        out[i, : b - a] = ids[a:b]
    return out


def collate_requests(requests: Sequence[Request], schema: DatasetSchema) -> ScenarioInputs:
    """Pads ``requests`` (all of one scenario, at least one) into :class:`ScenarioInputs`.

    Sizes are at least 1 along every padded axis (an empty context or bag is one padded slot),
    so an exported program never sees a zero-sized dimension.
    """
    if not requests:
        raise ValueError("collate_requests: no request")
    spec = schema.scenario(requests[0].scenario)
    if any(r.scenario != spec.name for r in requests):
        raise ValueError("collate_requests: requests of several scenarios; collate each scenario alone")
    seq_ids, seq_ts, seq_len = [], [], []
    for q in schema.ordered_sequences:
        ctx = [r.context[q.name] for r in requests]
        width = max(1, max(len(c) for c in ctx))
        ids = [
            np.stack([c.ids[f] for f in q.features], axis=-1).reshape(len(c), len(q.features)) for c in ctx
        ]
        seq_ids.append(torch.from_numpy(_pad_rows(ids, width, 0, np.int64)))
        seq_ts.append(torch.from_numpy(_pad_rows([c.ts for c in ctx], width, 0, np.int64)))
        seq_len.append(torch.tensor([len(c) for c in ctx], dtype=torch.int64))
    width = max(1, max(r.num_candidates for r in requests))
    columns = [c for _, c, _ in spec.categorical()]
    cand = [
        np.stack([r.features[c] for c in columns], axis=-1).reshape(r.num_candidates, len(columns))
        if columns
        else np.zeros((r.num_candidates, 0), np.int64)  # a scenario of multi-hot / dense features only
        for r in requests
    ]
    bags = []
    for _, column, _, _ in spec.multi_hot():
        mats = [_bag_matrix(*r.bags[column]) for r in requests]
        k = max(m.shape[1] for m in mats)
        mats = [np.pad(m, ((0, 0), (0, k - m.shape[1])), constant_values=-1) for m in mats]
        bags.append(torch.from_numpy(_pad_rows(mats, width, -1, np.int64)))
    dense = [r.dense.reshape(r.num_candidates, len(spec.dense_features)) for r in requests]
    return ScenarioInputs(
        seq_ids=seq_ids,
        seq_ts=seq_ts,
        seq_len=seq_len,
        cand_ids=torch.from_numpy(_pad_rows(cand, width, 0, np.int64)),
        cand_bags=bags,
        cand_dense=torch.from_numpy(_pad_rows(dense, width, 0, np.float32)),
        cand_ts=torch.from_numpy(_pad_rows([r.candidate_ts for r in requests], width, 0, np.int64)),
        cand_count=torch.tensor([r.num_candidates for r in requests], dtype=torch.int64),
    )


# ---------------------------------------------------------------------------- replay from a Batch
def _split(values: np.ndarray, lengths: np.ndarray) -> List[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _batch_contexts(batch: Batch, schema: DatasetSchema) -> List[Dict[str, SequenceContext]]:
    """Per sample of ``batch``, its behaviour sequences as request contexts."""
    kjt = batch.sparse_features.to_dict()
    contexts: List[Dict[str, SequenceContext]] = [{} for _ in range(batch.batch_size)]
    for q in schema.ordered_sequences:
        keys = [f"seq/{q.name}/{f}" for f in q.features]
        lengths = kjt[keys[0]].lengths().numpy()
        ts = batch.token_ts[batch.sequence_positions[q.name]].numpy()
        ids = {f: _split(kjt[k].values().numpy(), lengths) for f, k in zip(q.features, keys)}
        for b, sample_ts in enumerate(_split(ts, lengths)):
            contexts[b][q.name] = SequenceContext(sample_ts, {f: ids[f][b] for f in q.features})
    return contexts


def _scenario_bags(
    batch: Batch, schema: DatasetSchema, spec: ScenarioSpec
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Scenario ``spec``'s multi-hot features over its exposures of ``batch`` (KJT order), jagged."""
    if not spec.multi_hot_features:
        return {}
    start = 0
    for s in schema.scenarios:  # the bag batch is every scenario's exposures, scenario after scenario
        if s.name == spec.name:
            break
        start += int(batch.exposure_sample[s.name].shape[0])
    n = int(batch.exposure_sample[spec.name].shape[0])
    kjt = batch.bag_features.to_dict()
    out = {}
    for group, column, _, _ in spec.multi_hot():
        jt = kjt[f"bag/{spec.name}/{group}/{column}"]
        offsets = jt.offsets().numpy()
        lo, hi = offsets[start], offsets[start + n]
        out[column] = (offsets[start : start + n + 1] - lo, jt.values().numpy()[lo:hi])
    return out


def requests_from_batch(
    batch: Batch, schema: DatasetSchema, scenario: str
) -> Tuple[List[Request], List[np.ndarray]]:
    """Cuts a (CPU) training batch into scenario ``scenario``'s requests.

    One request per sample and raw ``request_id`` (the exposures served together), or per
    sample and exposure ts where the raw rows had no request id. Its context is the sample's H
    and R tokens; each candidate keeps its own ts, so it sees exactly what the training layout
    shows it (the R tokens at or after the request's last exposure are dropped, the others are
    masked per candidate).

    Returns:
        ``(requests, rows)``: ``rows[i]`` are request i's candidates' row indices in the batch's
        KJT order of the scenario (to put served scores back beside ``batch.labels``).
    """
    spec = schema.scenario(scenario)
    contexts = _batch_contexts(batch, schema)
    kjt = batch.sparse_features.to_dict()
    sample = batch.exposure_sample[scenario].numpy()
    ts = batch.token_ts[batch.target_positions[scenario]].numpy()
    request_id = batch.request_id[scenario].numpy() if scenario in batch.request_id else np.full_like(ts, -1)
    features = {c: kjt[f"exp/{scenario}/{g}/{c}"].values().numpy() for g, c, _ in spec.categorical()}
    bags = _scenario_bags(batch, schema, spec)
    dense = batch.dense_features[scenario].numpy()
    user = batch.user_id.numpy()
    # the group of an exposure: its request id, or (no id) its ts, kept apart by the flag
    has_id = request_id >= 0
    group_key = np.where(has_id, request_id, ts)
    order = np.lexsort((ts, group_key, has_id, sample))
    cuts = (np.diff(sample[order]) != 0) | (np.diff(has_id[order]) != 0) | (np.diff(group_key[order]) != 0)
    requests, rows = [], []
    for group in np.split(order, np.flatnonzero(cuts) + 1) if len(order) else []:
        b, last = int(sample[group[0]]), int(ts[group].max())
        ctx = {name: _before(seq, last) for name, seq in contexts[b].items()}
        full = Request(scenario, int(ts[group[0]]), ctx, features, dense, ts, bags, int(user[b]))
        requests.append(full.take(group))
        rows.append(group)
    return requests, rows


def _before(seq: SequenceContext, t: int) -> SequenceContext:
    """The actions of ``seq`` strictly before ``t``: no exposure of the request sees a later one."""
    keep = seq.ts < t
    if keep.all():
        return seq
    return SequenceContext(seq.ts[keep], {f: v[keep] for f, v in seq.ids.items()})
