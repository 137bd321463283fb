"""The JSON form of a request (what ``POST /score`` takes) and its checked conversion to
:class:`~mtfm_rec.serve.request.Request`.

::

    {"scenario": "sc0", "user_id": 7, "ts": 1234,
     "user": {"city": 3, "tags": [4, 1]},                      # the scenario's user features
     "context": {"orders": {"ts": [10, 20], "item": [5, null], "cat": [1, 2]}},
     "candidates": [{"item": 17, "cat": 2, "dist": 1, "price": 9.5}, ...]}

Rules (:func:`request_from_json`; a break raises :class:`RequestError` naming the JSON path of
the value, e.g. ``candidates[3].item``, and the rule):

* Keys: ``scenario``, ``user_id``, ``ts`` and ``candidates`` are required; ``user`` and
  ``context`` are optional (absent or ``null``: no user feature given, an empty context). A
  key, sequence, sequence feature or feature column that the schema does not declare is
  refused, listing the declared ones.
* ``scenario`` is one of the schema's scenarios; ``user_id`` and ``ts`` are ints (a bool is not
  an int) and ``ts`` is in the reader's safe range ``[-2**62, 2**62)``.
* ``context``: every declared sequence may be absent (an empty sequence). A sequence that is
  given has ``ts`` and every one of its features, lists of one length, at most
  ``RequestLimits.max_context``; ``ts`` non-decreasing (ties allowed; a request
  is never re-sorted: a non-ascending one is refused). A real-time sequence's actions must be
  strictly before the request ``ts`` (an action at or after it would be leakage: training never
  shows an exposure such an action); history actions are taken as given. Of each sequence the
  most recent ``max_len`` actions (dataset.yaml) are kept: the model never saw a longer one (a
  training exposure saw at most that many, docs/SERVING.md "Training and live contexts").
* Ids (single-id features, multi-hot ids, sequence features) are ints that fit int64, or
  ``null``. They are folded exactly as training folds them (:func:`mtfm_rec.data.schema.fold_ids`):
  an id outside ``[0, size)`` is **not** an error, it becomes ``v mod size``; ``null`` becomes
  ``size``, the "missing" row.
* ``user`` holds the scenario's user features (single-id and multi-hot); they are repeated onto
  every candidate, since training sees them as exposure columns. ``candidates`` (1 to
  ``max_candidates``) hold the item and cross features and the dense features.
* A single-id feature left out (of ``user`` or of a candidate) is ``null``: the missing row, as
  a null cell is in training. A multi-hot feature left out or ``null`` is a null list: ``[size]``,
  one missing id (as the reader folds a null list); ``[]`` stays empty (it pools to zero); a list
  holds at most ``max_bag_ids`` ids.
* Dense features are required on every candidate and are finite numbers within the float32
  range (``null`` is refused: the reader would read a null as 0.0, send 0.0 for that).
* Sizes beyond the limits (candidates, context length, bag ids) raise :class:`RequestTooLarge`,
  a :class:`RequestError` the HTTP service answers with 413.

Candidates are scored at the request time (``candidate_ts`` = ``ts``). :func:`request_to_json`
is the inverse (a folded id ``size`` is written as ``null``), for tests and load generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec, SequenceSpec, fold_ids
from mtfm_rec.serve.request import Request, SequenceContext

TS_MIN, TS_MAX = -(2**62), 2**62  # the reader's safe ts range (mtfm_rec.data.reader)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
TOP_KEYS = ("scenario", "user_id", "ts", "user", "context", "candidates")
REQUIRED_KEYS = ("scenario", "user_id", "ts", "candidates")

RULE_OBJECT = "must be a JSON object"
RULE_LIST = "must be a JSON list"
RULE_REQUIRED = "required key missing"
RULE_UNKNOWN = "not declared by the schema"
RULE_INT = "must be an int (a bool is not an int)"
RULE_ID = "must be an int or null (a bool is not an int)"
RULE_INT64 = "does not fit int64"
RULE_TS_RANGE = "ts outside the safe range [-2**62, 2**62)"
RULE_ASCENDING = "context ts must be non-decreasing (requests are not re-sorted)"
RULE_LEAKAGE = "real-time action at or after the request ts (leakage: training never shows it)"
RULE_LENGTH = "must have as many values as the sequence's ts"
RULE_DENSE = "must be a finite number within the float32 range (null is refused)"
RULE_NO_CANDIDATE = "at least one candidate is required"
RULE_TOO_MANY_CANDIDATES = "more candidates than RequestLimits.max_candidates"
RULE_CONTEXT_TOO_LONG = "more actions than RequestLimits.max_context"
RULE_BAG_TOO_LONG = "more ids than RequestLimits.max_bag_ids"


@dataclass(frozen=True)
class RequestLimits:
    """Size limits of one request (beyond them: :class:`RequestTooLarge`, HTTP 413).

    Attributes:
        max_candidates: candidates of one request.
        max_context: actions of one context sequence.
        max_body_bytes: bytes of an HTTP request body (checked by the HTTP service).
        max_bag_ids: ids of one multi-hot feature of one candidate (or of the user).
    """

    max_candidates: int = 2048
    max_context: int = 4096
    max_body_bytes: int = 8 * 1024 * 1024
    max_bag_ids: int = 256


class RequestError(ValueError):
    """A request that breaks the JSON contract (module docstring).

    Attributes:
        field: JSON path of the offending value (``candidates[3].item``; ``$`` is the request).
        rule: the rule it breaks.
    """

    def __init__(self, field: str, rule: str, detail: str = "") -> None:
        self.field, self.rule, self.detail = field, rule, detail
        super().__init__(f"{field}: {rule}" + (f" ({detail})" if detail else ""))


class RequestTooLarge(RequestError):
    """A request over one of the :class:`RequestLimits` (HTTP 413)."""


# ---------------------------------------------------------------------------- scalar checks
def _show(v: Any) -> str:
    """A short description of a JSON value for an error message (a container's size, never its
    repr: that could be megabytes, or nested deeper than repr's recursion limit)."""
    if isinstance(v, (list, dict)):
        return f"{'list' if isinstance(v, list) else 'object'} of {len(v)}"
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any, field: str) -> int:
    if not _is_int(v):
        raise RequestError(field, RULE_INT, f"got {_show(v)}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise RequestError(field, RULE_INT64, f"got {v}")
    return int(v)


def _ts(v: Any, field: str) -> int:
    t = _int(v, field)
    if not TS_MIN <= t < TS_MAX:
        raise RequestError(field, RULE_TS_RANGE, f"got {t}")
    return t


def _id(v: Any, field: str) -> Optional[int]:
    """A raw id (``None`` for null); folding happens on the whole column."""
    if v is None:
        return None
    if not _is_int(v):
        raise RequestError(field, RULE_ID, f"got {_show(v)}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise RequestError(field, RULE_INT64, f"got {v}")
    return int(v)


def _dense(v: Any, field: str) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    # abs() first: an int too large for a float makes math.isfinite raise; NaN compares False
    if not ok or not (abs(v) <= FLOAT32_MAX and math.isfinite(v)):
        raise RequestError(field, RULE_DENSE, f"got {_show(v)}")
    return float(v)


def _mapping(v: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise RequestError(field, RULE_OBJECT, f"got {type(v).__name__}")
    return v


def _list(v: Any, field: str) -> List[Any]:
    if not isinstance(v, list):
        raise RequestError(field, RULE_LIST, f"got {type(v).__name__}")
    return v


def _known_keys(obj: Mapping[str, Any], allowed: Sequence[str], field: str, what: str) -> None:
    """Refuses a key of ``obj`` outside ``allowed``, naming it and listing the declared ones."""
    for key in obj:
        if key not in allowed:
            path = f"{field}.{key}" if field != "$" else str(key)
            raise RequestError(path, RULE_UNKNOWN, f"declared {what}: {sorted(allowed)}")


def _fold(raw: Sequence[Optional[int]], size: int) -> np.ndarray:
    """``fold_ids`` of raw ids with ``None`` as null."""
    nulls = np.fromiter((v is None for v in raw), bool, len(raw))
    values = np.fromiter((0 if v is None else v for v in raw), np.int64, len(raw))
    return fold_ids(values, size, nulls)


def _bag(v: Any, field: str, size: int, limits: RequestLimits) -> np.ndarray:
    """The folded ids of one multi-hot value (``None``: a null list, ``[size]``)."""
    if v is None:
        return np.array([size], np.int64)
    ids = _list(v, field)
    if len(ids) > limits.max_bag_ids:
        raise RequestTooLarge(field, RULE_BAG_TOO_LONG, f"{len(ids)} > {limits.max_bag_ids}")
    return _fold([_id(x, f"{field}[{i}]") for i, x in enumerate(ids)], size)


# ---------------------------------------------------------------------------- parts
def _sequence(obj: Any, q: SequenceSpec, ts: int, limits: RequestLimits) -> SequenceContext:
    """One context sequence (module docstring: rules)."""
    field = f"context.{q.name}"
    seq = _mapping(obj, field)
    _known_keys(seq, ["ts", *q.features], field, f"keys of sequence {q.name!r}")
    for key in ["ts", *q.features]:
        if key not in seq:
            raise RequestError(f"{field}.{key}", RULE_REQUIRED, "a given sequence needs ts and every feature")
    raw_ts = _list(seq["ts"], f"{field}.ts")
    if len(raw_ts) > limits.max_context:
        raise RequestTooLarge(f"{field}.ts", RULE_CONTEXT_TOO_LONG, f"{len(raw_ts)} > {limits.max_context}")
    times = [_ts(t, f"{field}.ts[{i}]") for i, t in enumerate(raw_ts)]
    for i in range(1, len(times)):
        if times[i] < times[i - 1]:
            raise RequestError(f"{field}.ts[{i}]", RULE_ASCENDING, f"{times[i]} after {times[i - 1]}")
    if not q.is_history and times and times[-1] >= ts:
        i = next(i for i, t in enumerate(times) if t >= ts)
        raise RequestError(f"{field}.ts[{i}]", RULE_LEAKAGE, f"action ts {times[i]} >= request ts {ts}")
    ids = {}
    for f, size in q.features.items():
        values = _list(seq[f], f"{field}.{f}")
        if len(values) != len(times):
            raise RequestError(f"{field}.{f}", RULE_LENGTH, f"{len(values)} values, {len(times)} ts")
        ids[f] = _fold([_id(v, f"{field}.{f}[{i}]") for i, v in enumerate(values)], size)
    # a training exposure saw at most max_len actions of each sequence, its most recent ones
    keep = slice(max(0, len(times) - q.max_len), None)
    return SequenceContext(np.array(times[keep], np.int64), {f: v[keep] for f, v in ids.items()})


def _context(obj: Any, schema: DatasetSchema, ts: int, limits: RequestLimits) -> Dict[str, SequenceContext]:
    """Every declared sequence's context (an absent one is empty)."""
    ctx = _mapping({} if obj is None else obj, "context")
    _known_keys(ctx, [q.name for q in schema.sequences], "context", "sequences")
    out = {}
    for q in schema.sequences:
        if q.name in ctx:
            out[q.name] = _sequence(ctx[q.name], q, ts, limits)
        else:
            out[q.name] = SequenceContext(
                np.zeros(0, np.int64), {f: np.zeros(0, np.int64) for f in q.features}
            )
    return out


def _candidate_keys(spec: ScenarioSpec) -> List[str]:
    single = [c for g, c, _ in spec.categorical() if g != "user"]
    multi = [c for g, c, _, _ in spec.multi_hot() if g != "user"]
    return single + multi + list(spec.dense_features)


def _user_keys(spec: ScenarioSpec) -> List[str]:
    return [c for g, c, _ in spec.categorical() if g == "user"] + [
        c for g, c, _, _ in spec.multi_hot() if g == "user"
    ]


def _candidates(obj: Any, spec: ScenarioSpec, limits: RequestLimits) -> List[Mapping[str, Any]]:
    cands = _list(obj, "candidates")
    if not cands:
        raise RequestError("candidates", RULE_NO_CANDIDATE)
    if len(cands) > limits.max_candidates:
        raise RequestTooLarge(
            "candidates", RULE_TOO_MANY_CANDIDATES, f"{len(cands)} > {limits.max_candidates}"
        )
    allowed = _candidate_keys(spec)
    out = []
    for j, cand in enumerate(cands):
        c = _mapping(cand, f"candidates[{j}]")
        _known_keys(c, allowed, f"candidates[{j}]", f"candidate features of scenario {spec.name!r}")
        out.append(c)
    return out


def _features(
    spec: ScenarioSpec, user: Mapping[str, Any], cands: List[Mapping[str, Any]], limits: RequestLimits
) -> Tuple[Dict[str, np.ndarray], Dict[str, Tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """(single-id columns, multi-hot bags, dense) of the candidates, user features repeated."""
    m = len(cands)
    features = {}
    for group, column, size in spec.categorical():
        if group == "user":
            one = _fold([_id(user.get(column), f"user.{column}")], size)
            features[column] = np.repeat(one, m)
        else:
            raw = [_id(c.get(column), f"candidates[{j}].{column}") for j, c in enumerate(cands)]
            features[column] = _fold(raw, size)
    bags = {}
    for group, column, size, _ in spec.multi_hot():
        if group == "user":
            parts = [_bag(user.get(column), f"user.{column}", size, limits)] * m
        else:
            parts = [
                _bag(c.get(column), f"candidates[{j}].{column}", size, limits) for j, c in enumerate(cands)
            ]
        lengths = np.array([len(p) for p in parts], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        bags[column] = (offsets, np.concatenate(parts).astype(np.int64))
    dense = np.zeros((m, len(spec.dense_features)), np.float32)
    for j, c in enumerate(cands):
        for k, column in enumerate(spec.dense_features):
            field = f"candidates[{j}].{column}"
            if column not in c:
                raise RequestError(field, RULE_REQUIRED, "dense features are required on every candidate")
            dense[j, k] = _dense(c[column], field)
    return features, bags, dense


# ---------------------------------------------------------------------------- public
def request_from_json(obj: Any, schema: DatasetSchema, limits: Optional[RequestLimits] = None) -> Request:
    """The :class:`Request` of a decoded JSON request, checked against ``schema``.

    Args:
        obj: the decoded JSON (module docstring: the form and every rule).
        schema: the dataset schema the model was trained on.
        limits: size limits (default :class:`RequestLimits`).

    Returns:
        A request with every id folded (:func:`mtfm_rec.data.schema.fold_ids`: out-of-range ids
        ``v mod size``, nulls ``size``), ``features`` keyed by every
        ``ScenarioSpec.categorical()`` column, ``bags`` by every multi-hot column, ``dense``
        ``[M, n_dense]`` float32 in ``dense_features`` order and ``candidate_ts`` = ``ts``.

    Raises:
        RequestError: a rule is broken (``field`` and ``rule`` say which).
        RequestTooLarge: a size limit is exceeded.
    """
    limits = limits or RequestLimits()
    req = _mapping(obj, "$")
    _known_keys(req, TOP_KEYS, "$", "request keys")
    for key in REQUIRED_KEYS:
        if key not in req:
            raise RequestError(key, RULE_REQUIRED, f"required: {list(REQUIRED_KEYS)}")
    names = [s.name for s in schema.scenarios]
    if not isinstance(req["scenario"], str) or req["scenario"] not in names:
        raise RequestError("scenario", "unknown scenario", f"got {_show(req['scenario'])}; declared: {names}")
    spec = schema.scenario(req["scenario"])
    user_id, ts = _int(req["user_id"], "user_id"), _ts(req["ts"], "ts")
    user = _mapping({} if req.get("user") is None else req["user"], "user")
    _known_keys(user, _user_keys(spec), "user", f"user features of scenario {spec.name!r}")
    context = _context(req.get("context"), schema, ts, limits)
    cands = _candidates(req["candidates"], spec, limits)
    features, bags, dense = _features(spec, user, cands, limits)
    return Request(
        scenario=spec.name,
        ts=ts,
        context=context,
        features=features,
        dense=dense,
        candidate_ts=np.full(len(cands), ts, np.int64),
        bags=bags,
        user_id=user_id,
    )


def _ids_json(ids: np.ndarray, size: int) -> List[Optional[int]]:
    """Folded ids as JSON: the missing row ``size`` as ``null`` (it folds back to ``size``)."""
    return [None if int(v) == size else int(v) for v in ids]


def _same_for_all(values: List[Any], what: str) -> Any:
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"request_to_json: {what} differs across candidates; the JSON form has one value")
    return values[0]


def request_to_json(request: Request, schema: DatasetSchema) -> Dict[str, Any]:
    """The JSON form of ``request`` (the inverse of :func:`request_from_json` on folded requests).

    Raises:
        ValueError: ``request`` has something the JSON form cannot say: a user feature or
            candidate ts that differs across candidates.
    """
    spec = schema.scenario(request.scenario)
    m = request.num_candidates
    _same_for_all([int(t) for t in request.candidate_ts] + [request.ts], "candidate_ts (vs the request ts)")
    user: Dict[str, Any] = {}
    cands: List[Dict[str, Any]] = [{} for _ in range(m)]
    for group, column, size in spec.categorical():
        values = _ids_json(request.features[column], size)
        if group == "user":
            user[column] = _same_for_all(values, f"user feature {column!r}")
        else:
            for j in range(m):
                cands[j][column] = values[j]
    for group, column, size, _ in spec.multi_hot():
        offsets, ids = request.bags[column]
        lists = [_ids_json(ids[offsets[j] : offsets[j + 1]], size) for j in range(m)]
        if group == "user":
            user[column] = _same_for_all(lists, f"user feature {column!r}")
        else:
            for j in range(m):
                cands[j][column] = lists[j]
    for k, column in enumerate(spec.dense_features):
        for j in range(m):
            cands[j][column] = float(request.dense[j, k])
    context = {}
    for q in schema.sequences:
        seq = request.context.get(q.name)
        if seq is not None and len(seq):
            entry: Dict[str, Any] = {"ts": [int(t) for t in seq.ts]}
            entry.update({f: _ids_json(seq.ids[f], size) for f, size in q.features.items()})
            context[q.name] = entry
    out = {"scenario": request.scenario, "user_id": int(request.user_id), "ts": int(request.ts)}
    return {**out, "user": user, "context": context, "candidates": cands}
