"""Attention heatmaps across scenarios (the paper's Figure 5): T tokens against H and R tokens.

    python -m mtfm_rec.experiments heatmap --run-dir runs/synthetic [--layers 0,-1] [--samples 4]
        [--table-samples 256] [--out DIR] [--split test] [--group-by category]
        [--match KEY=FEATURE ...] [--checkpoint best]

From a trained run (its best checkpoint, :func:`mtfm_rec.serve.predictor.load_run`), the first
samples of the split whose T tokens come from at least two scenarios and that have H tokens are
run through the model under :func:`mtfm_rec.model.attention_probe.record_attention`. Per chosen
HTA layer, the weights ``silu(alpha q.k) / n_visible`` (mean over heads; no softmax, so they may
be negative and do not sum to 1) of each T token (rows, grouped by scenario) over the sample's H
and R tokens (columns, grouped by sequence, or with ``--group-by F`` by the value of the sequence
feature F, each block in time order) and over itself (the last column) are written to ``--out``
(default ``<run_dir>/heatmap``):

* ``layer<i>.png``: one panel per sample (``--samples``, default 4); grey cells are masked (an R
  token not strictly before the T token); a dot marks a key whose match feature (below) equals
  the candidate's; with ``--group-by`` each scenario's rows are sorted by the candidate's id;
* ``heatmap.md`` / ``heatmap.json``: per layer the **block means** (scenario x key block: the
  mean weight of a T token of that scenario on a visible key of that block, averaged over the
  samples that have both) and the **match table**, both over the first ``--table-samples``
  eligible samples (default 256; the count is in the output); ``summary.png``: the match table
  as bars. ``reconstruction_error``: max ``|weights @ v - the kernel's output|`` (a check).

**Match table** (the planted taste). Per scenario and key kind (H, R): for each T token with at
least one visible key whose sequence feature equals the candidate's feature and one whose does
not, the mean weight on the matching keys and on the others; the table gives the mean of both
over T tokens, their ratio (n/a unless the others' mean is positive) with a 95% bootstrap
interval over samples, and the share of T tokens that weigh matching keys more; the same of the
magnitudes ``|w|`` (``abs_*``), since without a softmax a large negative weight moves the output
as much as a large positive one; and the share of matching keys among the compared ones.
``--match KEY=FEATURE`` (repeatable) names the pair: ``KEY`` is a scenario's single-id feature
``exp/<s>/<group>/<f>`` or multi-hot feature ``bag/<s>/<group>/<f>`` (match: the history's id
is in the bag), ``<s>`` may be ``*`` (every scenario that has it); ``FEATURE`` is a sequence
feature ``<f>`` (every sequence that has it) or ``seq/<q>/<f>``. Both must have one id space of
the same size. Without ``--match``:

* a scenario feature listed with sequence features under dataset.yaml's ``shared_embeddings``
  (the declared same id space), the one with the smallest vocabulary if several (a category
  rather than an item id). Synthetic: ``exp/feed/item/category`` and ``exp/coupon/item/category``
  against ``category`` of ``orders`` and ``clicks_rt``; ml1m_swr: ``cate_id``;
* on a dataset of ``mtfm_rec.data.synthetic`` (``extra.generator``), for a scenario still
  without one: its item feature whose ids map one-to-one onto the item's global category in the
  generator's ``truth/`` folder (never seen by the model), through that map. This covers search's
  ``poi_cat`` (a permutation of the global category, on purpose) and the alignment-free set.

ml1m_genre declares no such sharing and its scenarios' ``genre`` is a local id, so pass the
global multi-hot genres: ``--match 'bag/*/item/genres=genre'``. A scenario without a match has
no row in the match table.

It stays one module: sample choice, the tables and the figures share the token annotations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model.attention import TargetAttentionLayer, _HSTULayer
from mtfm_rec.model.attention_probe import AttentionRecord, hta_layers, record_attention, resolve_layers

DEFAULT_LAYERS = (0, -1)
DEFAULT_TABLE_SAMPLES = 256
SELF = "self"
KINDS = {int(TokenKind.HISTORY): "H", int(TokenKind.REALTIME): "R"}


# ------------------------------------------------------------------------------------ matches
@dataclass(frozen=True)
class MatchSpec:
    """Which candidate feature of a scenario is compared with which sequence feature.

    Attributes:
        scenario: the scenario.
        candidate_key: ``exp/<s>/<g>/<f>`` (one id) or ``bag/<s>/<g>/<f>`` (a bag of ids).
        sequence_keys: ``seq/<q>/<f>`` keys compared with it (one id space).
        vocab: size of that id space (ids ``0 .. vocab-1``; ``vocab`` is the missing id).
        source: ``--match``, ``shared_embeddings`` or ``synthetic truth``.
        translate: candidate id -> sequence id (-1: none), or None for the identity.
    """

    scenario: str
    candidate_key: str
    sequence_keys: Tuple[str, ...]
    vocab: int
    source: str
    translate: Optional[np.ndarray] = field(default=None, compare=False)


def _candidate_features(schema: DatasetSchema, scenario: str) -> Dict[str, int]:
    """Scenario key -> declared size, single-id (``exp/``) and multi-hot (``bag/``)."""
    spec = schema.scenario(scenario)
    out = {f"exp/{scenario}/{g}/{c}": n for g, c, n in spec.categorical()}
    out.update({f"bag/{scenario}/{g}/{c}": n for g, c, n, _ in spec.multi_hot()})
    return out


def _sequence_keys(schema: DatasetSchema, feature: str) -> Dict[str, int]:
    """``seq/<q>/<f>`` keys meant by ``feature`` (``<f>`` or ``seq/<q>/<f>``) -> declared size."""
    sizes = {f"seq/{q.name}/{f}": n for q in schema.sequences for f, n in q.features.items()}
    if feature.startswith("seq/"):
        return {feature: sizes[feature]} if feature in sizes else {}
    return {k: n for k, n in sizes.items() if k.rsplit("/", 1)[1] == feature}


def parse_match(text: str, schema: DatasetSchema) -> List[MatchSpec]:
    """The specs of one ``--match KEY=FEATURE`` (module docstring); a ``ValueError`` naming
    the part at fault otherwise."""
    if text.count("=") != 1:
        raise ValueError(f"--match {text!r}: expected KEY=FEATURE, e.g. exp/feed/item/category=category")
    key, feature = (part.strip() for part in text.split("="))
    parts = key.split("/")
    if len(parts) != 4 or parts[0] not in ("exp", "bag"):
        raise ValueError(f"--match {text!r}: KEY must be exp/<scenario>/<group>/<feature> or bag/...")
    seq = _sequence_keys(schema, feature)
    if not seq:
        names = sorted({f for q in schema.sequences for f in q.features})
        raise ValueError(f"--match {text!r}: no sequence has feature {feature!r}; sequence features: {names}")
    scenarios = [s.name for s in schema.scenarios] if parts[1] == "*" else [parts[1]]
    specs = []
    for s in scenarios:
        if s not in [x.name for x in schema.scenarios]:
            raise ValueError(f"--match {text!r}: no scenario {s!r}")
        candidate = "/".join([parts[0], s, *parts[2:]])
        size = _candidate_features(schema, s).get(candidate)
        if size is None:
            if parts[1] == "*":
                continue
            raise ValueError(f"--match {text!r}: scenario {s!r} has no feature {candidate!r}")
        specs.append(_checked_spec(s, candidate, seq, size, "--match"))
    if not specs:
        raise ValueError(f"--match {text!r}: no scenario has {key!r}")
    return specs


def _checked_spec(scenario: str, candidate: str, seq: Mapping[str, int], size: int, source: str) -> MatchSpec:
    """A spec whose candidate and sequence features all have ``size`` ids (one id space)."""
    wrong = {k: n for k, n in seq.items() if n != size}
    if wrong:
        raise ValueError(
            f"match {candidate}={sorted(seq)}: {candidate} has {size} ids but {wrong}; "
            "features of different sizes cannot share one id space"
        )
    return MatchSpec(scenario, candidate, tuple(sorted(seq)), size, source)


def shared_matches(schema: DatasetSchema) -> Dict[str, MatchSpec]:
    """Per scenario, its feature that ``shared_embeddings`` puts in one table with sequence
    features (the smallest such vocabulary if several)."""
    out: Dict[str, MatchSpec] = {}
    for s in schema.scenarios:
        sizes = _candidate_features(schema, s.name)
        found = []
        for keys in schema.shared_embeddings.values():
            seq = {k: n for k, n in _all_sequence_sizes(schema).items() if k in keys}
            found += [(sizes[k], k, seq) for k in keys if k in sizes and seq]
        if found:
            size, key, seq = min(found, key=lambda t: (t[0], t[1]))
            out[s.name] = _checked_spec(s.name, key, seq, size, "shared_embeddings")
    return out


def _all_sequence_sizes(schema: DatasetSchema) -> Dict[str, int]:
    return {f"seq/{q.name}/{f}": n for q in schema.sequences for f, n in q.features.items()}


def synthetic_truth_matches(schema: DatasetSchema, raw: str, skip: Sequence[str]) -> Dict[str, MatchSpec]:
    """On a ``mtfm_rec.data.synthetic`` dataset, per scenario not in ``skip``: the item feature
    whose ids map one-to-one onto the truth's global ``category``, through that map, against
    the sequences' ``category`` (module docstring). Empty on any other dataset."""
    generator = schema.extra.get("generator") or {}
    if generator.get("module") != "mtfm_rec.data.synthetic":
        return {}
    from mtfm_rec.data.reader import read_parquet_folder
    from mtfm_rec.data.synthetic import read_truth

    seq = _sequence_keys(schema, "category")
    n_cat = int(generator["num_categories"])
    if not seq:
        return {}
    out: Dict[str, MatchSpec] = {}
    for s in schema.scenarios:
        if s.name in skip:
            continue
        category = read_truth(raw, s.name).column("category").to_numpy()
        exposures = read_parquet_folder(raw, f"exposures/{s.name}")
        for f, n in s.item_features.items():
            ids = exposures.column(f)
            if n != n_cat or ids.null_count:
                continue
            ids_np = ids.to_numpy().astype(np.int64)
            if len(ids_np) == 0 or ids_np.min() < 0 or ids_np.max() >= n:
                continue  # ids the fold would move: not one id space with the truth
            translate = np.full(n, -1, np.int64)
            translate[ids_np] = category
            if np.array_equal(translate[ids_np], category) and len(set(translate[translate >= 0])) == n:
                spec = _checked_spec(s.name, f"exp/{s.name}/item/{f}", seq, n, "synthetic truth")
                out[s.name] = dataclasses.replace(spec, translate=translate)
                break
    return out


def resolve_matches(schema: DatasetSchema, raw: str, texts: Sequence[str]) -> Dict[str, MatchSpec]:
    """Scenario -> its match: the ``--match`` texts if any, else the defaults (module docstring)."""
    if texts:
        out: Dict[str, MatchSpec] = {}
        for text in texts:
            for spec in parse_match(text, schema):
                if spec.scenario in out:
                    raise ValueError(f"--match: scenario {spec.scenario!r} is matched twice")
                out[spec.scenario] = spec
        return out
    out = shared_matches(schema)
    out.update(synthetic_truth_matches(schema, raw, list(out)))
    return {s.name: out[s.name] for s in schema.scenarios if s.name in out}


# ------------------------------------------------------------------------- token annotations
@dataclass
class Tokens:
    """Per token row of one batch, what the tables and figures label and compare.

    Attributes:
        kind, group: ``Batch.token_kind`` / ``token_group`` as numpy.
        block: per token its column block label (the sequence, or ``<q> <f>=<v>``; "" for T).
        block_order: per token a sort key of its block (schema order, then value).
        key_value: per scenario with a match, the sequence id of each token (-1: none).
        candidate: per scenario with a match, ``[N, vocab]`` bool: the ids the T token holds.
    """

    kind: np.ndarray
    group: np.ndarray
    block: np.ndarray
    block_order: np.ndarray
    key_value: Dict[str, np.ndarray]
    candidate: Dict[str, np.ndarray]


def _sequence_values(batch: Batch, schema: DatasetSchema, key: str) -> np.ndarray:
    """``[N]`` the id of sequence feature ``key`` (``seq/<q>/<f>``) per token; -1 elsewhere and
    where the id is the missing one."""
    q = key.split("/")[1]
    size = _all_sequence_sizes(schema)[key]
    out = np.full(batch.num_tokens, -1, np.int64)
    values = batch.sparse_features[key].values().numpy()
    out[batch.sequence_positions[q].numpy()] = np.where(values < size, values, -1)
    return out


def _candidate_ids(batch: Batch, schema: DatasetSchema, spec: MatchSpec) -> np.ndarray:
    """``[N, vocab]`` bool: per T token of ``spec.scenario``, the (translated) ids it holds."""
    out = np.zeros((batch.num_tokens, spec.vocab), bool)
    rows = batch.target_positions[spec.scenario].numpy()
    if spec.candidate_key.startswith("bag/"):
        offset = sum(len(batch.target_positions[s.name]) for s in schema.scenarios[: _index(schema, spec)])
        jt = batch.bag_features[spec.candidate_key]
        lengths = jt.lengths().numpy()[offset : offset + len(rows)]
        start = int(jt.lengths().numpy()[:offset].sum())
        ids = jt.values().numpy()[start : start + int(lengths.sum())]
        owner = np.repeat(rows, lengths)
    else:
        ids, owner = batch.sparse_features[spec.candidate_key].values().numpy(), rows
    if spec.translate is not None:
        ids = np.where(
            ids < len(spec.translate), spec.translate[np.minimum(ids, len(spec.translate) - 1)], -1
        )
    keep = (ids >= 0) & (ids < spec.vocab)
    out[owner[keep], ids[keep]] = True
    return out


def _index(schema: DatasetSchema, spec: MatchSpec) -> int:
    return [s.name for s in schema.scenarios].index(spec.scenario)


def annotate(
    batch: Batch, schema: DatasetSchema, matches: Mapping[str, MatchSpec], group_by: Optional[str]
) -> Tokens:
    """The :class:`Tokens` of a batch: blocks by sequence, or by ``group_by``'s value."""
    kind, group = batch.token_kind.numpy().astype(np.int64), batch.token_group.numpy()
    seqs = schema.ordered_sequences
    block = np.array([f"{q.name}" for q in seqs] + [""] * len(schema.scenarios), dtype=object)[group]
    order = group.astype(np.float64) * 1e6
    if group_by is not None:
        for key in _sequence_keys(schema, group_by):
            values = _sequence_values(batch, schema, key)
            has = values >= 0
            q = key.split("/")[1]
            block[has] = [f"{q} {group_by}={v}" for v in values[has]]
            order[has] += values[has]
    key_value = {}
    for s, spec in matches.items():
        values = np.full(batch.num_tokens, -1, np.int64)
        for key in spec.sequence_keys:
            v = _sequence_values(batch, schema, key)
            values = np.where(v >= 0, v, values)
        key_value[s] = values
    candidate = {s: _candidate_ids(batch, schema, spec) for s, spec in matches.items()}
    return Tokens(kind, group, block, order, key_value, candidate)


def _group_by_checked(schema: DatasetSchema, group_by: Optional[str]) -> None:
    if group_by is not None and not _sequence_keys(schema, group_by):
        names = sorted({f for q in schema.sequences for f in q.features})
        raise ValueError(f"--group-by {group_by!r}: no sequence has that feature; sequence features: {names}")


# --------------------------------------------------------------------------- sample views
@dataclass
class SampleView:
    """One recorded sample: its T tokens against its context keys, per layer.

    Attributes:
        user_id, batch, sample: where it came from.
        scenarios: ``[L_T]`` the scenario of each T token (rows, in layout order).
        kinds: ``[L_k]`` the kind of each key of the sample.
        labels: ``[L_k]`` each key's block, ``"<H|R>: <block>"`` ("" for T tokens).
        context: indices of the keys shown as columns (H and R, grouped, then in time order).
        self_index: ``[L_T]`` each T token's own key index.
        rows: the order in which the figure shows the T tokens (scenario blocks kept).
        weights, visible: per layer ``[L_T, L_k]`` (mean over heads) and the mask.
        match, comparable: ``[L_T, L_k]`` bool: the key's id is one the T token's candidate
            holds / both have an id (False for T tokens of a scenario without a match).
        reconstruction: per layer, max ``|weights @ v - kernel output|`` over heads.
    """

    user_id: int
    batch: int
    sample: int
    scenarios: np.ndarray
    kinds: np.ndarray
    labels: np.ndarray
    context: np.ndarray
    self_index: np.ndarray
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    weights: Dict[int, np.ndarray] = field(default_factory=dict)
    visible: Dict[int, np.ndarray] = field(default_factory=dict)
    match: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    comparable: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    reconstruction: Dict[int, float] = field(default_factory=dict)


def _view(
    batch: Batch,
    index: int,
    tokens: Tokens,
    schema: DatasetSchema,
    records: Sequence[AttentionRecord],
    sort_rows: bool,
) -> SampleView:
    """The :class:`SampleView` of sample ``records[0].sample`` of batch number ``index``;
    ``sort_rows``: show each scenario's T tokens by their candidate's (first) matched id."""
    first = records[0]
    q_rows, k_rows = first.query_rows.numpy(), first.key_rows.numpy()
    names = [s.name for s in schema.scenarios]
    scenarios = np.array([names[g - len(schema.sequences)] for g in tokens.group[q_rows]], dtype=object)
    kinds, blocks = tokens.kind[k_rows], tokens.block[k_rows]
    context = np.flatnonzero(kinds != TokenKind.TARGET)
    context = context[np.lexsort((context, tokens.block_order[k_rows][context], kinds[context]))]
    labels = np.array([f"{KINDS[k]}: {b}" if k in KINDS else "" for k, b in zip(kinds, blocks)], dtype=object)
    view = SampleView(
        user_id=int(batch.user_id[first.sample]),
        batch=index,
        sample=first.sample,
        scenarios=scenarios,
        kinds=kinds,
        labels=labels,
        context=context,
        self_index=q_rows - k_rows[0],
        rows=np.arange(len(q_rows)),
    )
    view.match = np.zeros((len(q_rows), len(k_rows)), bool)
    view.comparable = np.zeros_like(view.match)
    for s, values in tokens.key_value.items():
        mine = scenarios == s
        key_ids = values[k_rows]
        held = tokens.candidate[s][q_rows[mine]]  # [n, vocab]
        has_id = key_ids >= 0
        view.match[mine] = held[:, np.maximum(key_ids, 0)] & has_id[None, :]
        view.comparable[mine] = held.any(1)[:, None] & has_id[None, :]
    if sort_rows:
        first_id = np.full(len(q_rows), np.iinfo(np.int64).max)
        for s in tokens.candidate:
            mine = scenarios == s
            held = tokens.candidate[s][q_rows[mine]]
            first_id[mine] = np.where(held.any(1), held.argmax(1), first_id[mine])
        group = tokens.group[q_rows]
        view.rows = np.lexsort((np.arange(len(q_rows)), first_id, group))
    for r in records:
        view.weights[r.layer] = r.weights.mean(0).double().numpy()
        view.visible[r.layer] = r.visible.numpy()
        view.reconstruction[r.layer] = r.reconstruction_error()
    return view


def _eligible(batch: Batch, schema: DatasetSchema) -> List[int]:
    """Samples with H tokens, T tokens of >= 2 scenarios and a labelled exposure (an evaluation
    batch's tail repeats real samples with every label masked)."""
    scenarios_of: List[set] = [set() for _ in range(batch.batch_size)]
    labelled = np.zeros(batch.batch_size, bool)
    for s in schema.scenarios:
        owners = batch.exposure_sample[s.name].numpy()
        for b in np.unique(owners):
            scenarios_of[b].add(s.name)
        np.logical_or.at(labelled, owners, batch.label_mask[s.name].numpy().any(1))
    history = batch.num_history.numpy()
    return [
        b for b in range(batch.batch_size) if history[b] > 0 and len(scenarios_of[b]) >= 2 and labelled[b]
    ]


def collect_views(
    model: torch.nn.Module,
    batches: Any,
    schema: DatasetSchema,
    layers: Sequence[int],
    num_samples: int,
    matches: Mapping[str, MatchSpec],
    group_by: Optional[str],
    table_samples: int = 0,
) -> List[SampleView]:
    """Runs the first ``max(num_samples, table_samples)`` eligible samples of ``batches``
    through ``model`` while recording ``layers`` (fewer if the batches hold fewer, but a
    ``ValueError`` if they hold fewer than ``num_samples``)."""
    wanted = max(num_samples, table_samples)
    views: List[SampleView] = []
    for index, batch in enumerate(batches):
        chosen = _eligible(batch, schema)[: wanted - len(views)]
        if not chosen:
            continue
        with torch.no_grad(), record_attention(model, layers, chosen) as rec:
            model(batch)
        tokens = annotate(batch, schema, matches, group_by)
        for i, _ in enumerate(chosen):
            records = [rec.records[layer][i] for layer in rec.layers]
            views.append(_view(batch, index, tokens, schema, records, group_by is not None))
        if len(views) == wanted:
            break
    if len(views) >= num_samples:
        return views
    raise ValueError(
        f"--samples {num_samples}: the split has only {len(views)} samples with H tokens and "
        "T tokens of at least two scenarios"
    )


# ------------------------------------------------------------------------------- the tables
def block_means(views: Sequence[SampleView], layer: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Scenario -> key block (and ``self``) -> ``{"mean", "samples"}``: per sample the mean
    weight of the scenario's T tokens on the block's visible keys, then the mean over samples."""
    acc: Dict[Tuple[str, str], List[float]] = {}
    for v in views:
        w, vis = v.weights[layer], v.visible[layer]
        for s in dict.fromkeys(v.scenarios):
            rows = np.flatnonzero(v.scenarios == s)
            for block in dict.fromkeys(v.labels[v.context]):
                cols = v.context[v.labels[v.context] == block]
                cell = vis[np.ix_(rows, cols)]
                if cell.any():
                    acc.setdefault((s, block), []).append(float(w[np.ix_(rows, cols)][cell].mean()))
            acc.setdefault((s, SELF), []).append(float(w[rows, v.self_index[rows]].mean()))
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for (s, block), values in sorted(acc.items(), key=lambda item: _block_key(item[0][1])):
        out.setdefault(s, {})[block] = {"mean": float(np.mean(values)), "samples": len(values)}
    return out


def _block_key(label: str) -> Tuple[int, str, int]:
    """Sort key of a block label: H, then R, then ``self``; by sequence, then by numeric value
    (``"H: orders category=10"`` after ``"H: orders category=2"``)."""
    if label == SELF:
        return (2, "", 0)
    name, _, value = label.partition("=")
    return (0 if label.startswith("H") else 1, name, int(value) if value.lstrip("-").isdigit() else -1)


def match_means(views: Sequence[SampleView], layer: int) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Scenario -> key kind (H, R) -> the match statistics (module docstring), of the signed
    weights and of their magnitudes (``abs_*``: without a softmax a large negative weight moves
    the output as much as a large positive one)."""
    per: Dict[Tuple[str, str], List[Tuple[float, ...]]] = {}
    for n, v in enumerate(views):
        w, vis = v.weights[layer], v.visible[layer]
        for kind_id, kind in KINDS.items():
            keys = v.kinds == kind_id
            for i in range(len(v.scenarios)):
                ok = vis[i] & keys & v.comparable[i]
                hit, miss = ok & v.match[i], ok & ~v.match[i]
                if hit.any() and miss.any():
                    row = (
                        w[i, hit].mean(),
                        w[i, miss].mean(),
                        np.abs(w[i, hit]).mean(),
                        np.abs(w[i, miss]).mean(),
                    )
                    per.setdefault((v.scenarios[i], kind), []).append(row + (hit.sum() / ok.sum(), n))
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for (s, kind), rows in per.items():
        a = np.array(rows)
        match, other, abs_match, abs_other = (float(x) for x in a[:, :4].mean(0))
        out.setdefault(s, {})[kind] = {
            "match": match,
            "other": other,
            "ratio": match / other if other > 0 else None,  # None: JSON has no NaN
            "ratio_ci": _ratio_ci(a[:, 0], a[:, 1], a[:, 5]),
            "share_higher": float((a[:, 0] > a[:, 1]).mean()),
            "abs_match": abs_match,
            "abs_other": abs_other,
            "abs_ratio": abs_match / abs_other if abs_other > 0 else None,
            "abs_ratio_ci": _ratio_ci(a[:, 2], a[:, 3], a[:, 5]),
            "abs_share_higher": float((a[:, 2] > a[:, 3]).mean()),
            "match_key_share": float(a[:, 4].mean()),
            "queries": len(rows),
            "samples": len(np.unique(a[:, 5])),
        }
    return out


def _ratio_ci(
    num: np.ndarray, den: np.ndarray, sample: np.ndarray, reps: int = 1000
) -> Optional[List[float]]:
    """95% bootstrap interval of ``mean(num) / mean(den)`` over T tokens, resampling whole
    samples (a sample's T tokens share its history, so they are not independent); None where a
    resampled denominator is not positive or there is one sample only."""
    ids, index = np.unique(sample, return_inverse=True)
    if len(ids) < 2:
        return None
    sums = np.stack([np.bincount(index, weights=x, minlength=len(ids)) for x in (num, den)])
    counts = np.random.default_rng(0).multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=reps)
    top, bottom = counts @ sums[0], counts @ sums[1]
    if (bottom <= 0).any():
        return None
    lo, hi = np.quantile(top / bottom, [0.025, 0.975])
    return [float(lo), float(hi)]


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2e}" if abs(x) < 1e-2 else f"{x:.4f}"


def _block_table(
    blocks: Mapping[str, Mapping[str, Mapping[str, float]]], scenarios: Sequence[str]
) -> List[str]:
    """The block means as markdown rows: scenarios x blocks, or blocks x scenarios when there
    are more than 8 blocks (``--group-by``)."""
    cols = sorted({b for row in blocks.values() for b in row}, key=_block_key)

    def cell(s: str, b: str) -> str:
        c = blocks[s].get(b)
        return f"{_fmt(c['mean'])} ({c['samples']})" if c else ""

    if len(cols) > 8:
        out = ["| key block | " + " | ".join(scenarios) + " |", "|---" * (len(scenarios) + 1) + "|"]
        return out + [f"| {b} | " + " | ".join(cell(s, b) for s in scenarios) + " |" for b in cols]
    out = ["| scenario | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    return out + [f"| {s} | " + " | ".join(cell(s, b) for b in cols) + " |" for s in scenarios]


def _ci(value: Optional[float], ci: Optional[Sequence[float]]) -> str:
    return _fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "")


def _match_table(table: Mapping[str, Mapping[str, Mapping[str, Any]]], scenarios: Sequence[str]) -> List[str]:
    """The match statistics as markdown rows, one per scenario (in ``scenarios`` order) and key
    kind."""
    head = ["scenario", "keys", "match", "other", "ratio", "share higher", "abs match", "abs other"]
    head += ["abs ratio", "abs share higher", "matching keys", "T tokens (samples)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for s in [x for x in scenarios if x in table]:
        for kind, m in sorted(table[s].items()):
            cells = [s, kind, _fmt(m["match"]), _fmt(m["other"]), _ci(m["ratio"], m["ratio_ci"])]
            cells += [f"{m['share_higher']:.2f}", _fmt(m["abs_match"]), _fmt(m["abs_other"])]
            cells += [_ci(m["abs_ratio"], m["abs_ratio_ci"]), f"{m['abs_share_higher']:.2f}"]
            cells += [f"{m['match_key_share']:.2f}", f"{m['queries']} ({m['samples']})"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    """``heatmap.md``: per layer the block means and the match table."""
    lines = [
        f"# Attention heatmap: {result['run_dir']}",
        "",
        f"Split {result['split']}, checkpoint {result['checkpoint']}; figures: {len(result['samples'])} "
        f"samples, tables: the first {result['table_samples']} samples with H tokens and T tokens of "
        ">= 2 scenarios.",
        "",
        "Weights `silu(alpha q.k) / n_visible`, mean over heads, of T tokens (rows) on visible keys.",
        "Match: "
        + (
            "; ".join(
                f"{s}: `{m['candidate']}` = `{'`, `'.join(m['sequence'])}` ({m['source']})"
                for s, m in result["match"].items()
            )
            or "none"
        ),
    ]
    for layer in result["layers"]:
        i = str(layer["index"])
        blocks = result["block_means"][i]
        lines += ["", f"## Layer {i} ({layer['kind']})", "", "Block means (samples in brackets):", ""]
        lines += _block_table(blocks, [x for x in result["scenarios"] if x in blocks])
        lines += [
            "",
            "Match table (per T token: mean weight on keys whose id matches the candidate's vs on the "
            "others, averaged over T tokens; abs: the same of the magnitudes; [95% bootstrap interval "
            "over samples]):",
            "",
        ]
        lines += _match_table(result["match_means"][i], result["scenarios"])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the figures
def _spans(labels: Sequence[str]) -> List[Tuple[str, int, int]]:
    """Runs of equal consecutive labels as ``(label, start, end)``."""
    out: List[Tuple[str, int, int]] = []
    for i, label in enumerate(labels):
        if out and out[-1][0] == label:
            out[-1] = (label, out[-1][1], i + 1)
        else:
            out.append((label, i, i + 1))
    return out


def _panel(ax: Any, fig: Any, view: SampleView, layer: int) -> None:
    """One sample's heatmap: T tokens by scenario x context keys by block, then ``self``."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    rows = view.rows
    w, vis = view.weights[layer][rows], view.visible[layer][rows]
    grid = np.concatenate(
        [w[:, view.context], w[np.arange(len(rows)), view.self_index[rows]][:, None]], axis=1
    )
    shown = np.concatenate([vis[:, view.context], np.ones((len(rows), 1), bool)], axis=1)
    data = np.ma.masked_array(grid, ~shown)
    # one scale for both signs, so that small negative weights look small
    top = float(max(np.abs(grid[shown]).max(), 1e-12))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=Normalize(-top, top))
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="weight")
    hit = np.concatenate([view.match[rows][:, view.context], np.zeros((len(rows), 1), bool)], axis=1) & shown
    yy, xx = np.nonzero(hit)
    ax.scatter(xx, yy, s=5, c="k", marker="o", linewidths=0)
    col_labels = list(view.labels[view.context])
    _label_axis(ax, _spans(col_labels + [SELF]), "x", len(col_labels) + 1)
    _label_axis(ax, _spans(list(view.scenarios[rows])), "y", len(rows))
    n_h, n_r = int((view.kinds == TokenKind.HISTORY).sum()), int((view.kinds == TokenKind.REALTIME).sum())
    ax.set_title(
        f"user {view.user_id} (batch {view.batch}, sample {view.sample}): "
        f"{n_h} H, {n_r} R, {len(rows)} T tokens",
        fontsize=9,
    )


def _label_axis(ax: Any, spans: Sequence[Tuple[str, int, int]], axis: str, n: int) -> None:
    """Block labels at block centres and separator lines between blocks."""
    centres = [(a + b - 1) / 2 for _, a, b in spans]
    labels = [f"{label} ({b - a})" for label, a, b in spans]
    many = len(spans) > 8
    for _, a, _ in spans[1:]:
        (ax.axvline if axis == "x" else ax.axhline)(a - 0.5, color="k", lw=0.8)
    if axis == "x":
        ax.set_xticks(centres, labels, rotation=90 if many else 0, fontsize=6 if many else 8)
        ax.set_xlim(-0.5, n - 0.5)
    else:
        ax.set_yticks(centres, labels, fontsize=8)


def plot_layer(views: Sequence[SampleView], layer: int, kind: str, heads: int, path: str, note: str) -> None:
    """``layer<i>.png``: one panel per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(3.0, len(v.scenarios)) for v in views]
    inches = 1.6 + 0.17 * sum(heights) + 1.3 * len(views)
    fig, axes = plt.subplots(
        len(views),
        1,
        figsize=(14, inches),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, view in zip(axes[:, 0], views):
        _panel(ax, fig, view, layer)
        ax.set_ylabel("T tokens (queries)", fontsize=8)
    axes[-1, 0].set_xlabel(
        "keys: H then R tokens by block, time order within; last column: the T token itself"
    )
    fig.suptitle(
        f"Layer {layer} ({kind}): silu(alpha q.k) / n_visible, mean over {heads} heads; grey: masked; {note}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / inches))  # room for the suptitle
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_summary(result: Mapping[str, Any], path: str) -> None:
    """``summary.png``: per layer, the match table's mean weights as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, axes = plt.subplots(2, len(layers), figsize=(5.5 * len(layers), 7.0), squeeze=False)
    for col, layer in enumerate(layers):
        table = result["match_means"][str(layer["index"])]
        bars = [(s, k) for s in result["scenarios"] if s in table for k in sorted(table[s])]
        x = np.arange(len(bars))
        for row, (prefix, what) in enumerate(
            (("", "mean weight per key"), ("abs_", "mean |weight| per key"))
        ):
            ax = axes[row, col]
            ax.bar(x - 0.2, [table[s][k][prefix + "match"] for s, k in bars], 0.4, label="matching keys")
            ax.bar(x + 0.2, [table[s][k][prefix + "other"] for s, k in bars], 0.4, label="other keys")
            ax.set_xticks(x, [f"{s}\n{k}" for s, k in bars], fontsize=8)
            ax.axhline(0.0, color="k", lw=0.6)
            ax.set_title(f"layer {layer['index']} ({layer['kind']}): {what}", fontsize=10)
            ax.set_ylabel(what)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        "T tokens' weight on H / R tokens whose id matches the candidate's "
        f"({result['table_samples']} samples)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- the run
def heatmap(
    run_dir: str,
    out_dir: Optional[str] = None,
    layers: Sequence[int] = DEFAULT_LAYERS,
    num_samples: int = 4,
    split: str = "test",
    group_by: Optional[str] = None,
    match: Sequence[str] = (),
    table_samples: int = DEFAULT_TABLE_SAMPLES,
    checkpoint: str = "best",
) -> Dict[str, Any]:
    """Writes the figures and tables of ``run_dir`` into ``out_dir`` (module docstring) and
    returns what ``heatmap.json`` holds.

    The figures show the first ``num_samples`` eligible samples of ``split``; the tables
    average over the first ``max(num_samples, table_samples)`` (fewer if the split has fewer:
    ``heatmap.json`` says how many)."""
    from mtfm_rec.data.loader import ResumableLoader
    from mtfm_rec.serve.predictor import load_run

    if num_samples < 1 or table_samples < 0:
        raise ValueError(f"--samples {num_samples} must be >= 1, --table-samples {table_samples} >= 0")
    run = load_run(run_dir, checkpoint)
    if not run.config.model.use_sequences:
        raise ValueError(f"{run_dir}: model.use_sequences=false: the model attends to no H or R token")
    stack = hta_layers(run.model)
    chosen = resolve_layers(len(stack), layers)
    _group_by_checked(run.schema, group_by)
    matches = resolve_matches(run.schema, run.config.data.raw, match)
    loader = ResumableLoader.from_config(run.dataset_dir, run.config.data, split=split, rank=0, world_size=1)
    loader.num_workers = 0  # a few batches: worker processes would cost more than they save
    views = collect_views(
        run.model, iter(loader), run.schema, chosen, num_samples, matches, group_by, table_samples
    )
    names = [s.name for s in run.schema.scenarios]
    result = _result(
        run_dir, run.checkpoint, split, chosen, stack, views, num_samples, matches, group_by, names
    )
    _write(result, views[:num_samples], stack, out_dir or os.path.join(run_dir, "heatmap"))
    return result


def _write(
    result: Dict[str, Any], views: Sequence[SampleView], stack: Sequence[_HSTULayer], out_dir: str
) -> None:
    """The figures (their paths appended to ``result["figures"]``), heatmap.json, heatmap.md."""
    os.makedirs(out_dir, exist_ok=True)
    note = "dots: key id = candidate id (match)" if result["match"] else "no match feature"
    if result["group_by"]:
        note += f"; rows by candidate id within scenario, columns by {result['group_by']}"
    for layer in result["layers"]:
        path = os.path.join(out_dir, f"layer{layer['index']}.png")
        plot_layer(views, layer["index"], layer["kind"], stack[layer["index"]].num_heads, path, note)
        result["figures"].append(path)
    if result["match"]:
        plot_summary(result, os.path.join(out_dir, "summary.png"))
        result["figures"].append(os.path.join(out_dir, "summary.png"))
    with open(os.path.join(out_dir, "heatmap.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(out_dir, "heatmap.md"), "w") as fh:
        fh.write(markdown(result))


def _result(
    run_dir: str,
    checkpoint: str,
    split: str,
    layers: Sequence[int],
    stack: Sequence[_HSTULayer],
    views: Sequence[SampleView],
    num_samples: int,
    matches: Mapping[str, MatchSpec],
    group_by: Optional[str],
    scenarios: Sequence[str],
) -> Dict[str, Any]:
    """What ``heatmap.json`` holds (the figures are added by :func:`_write`)."""
    kinds = ["target" if isinstance(layer, TargetAttentionLayer) else "full" for layer in stack]
    return {
        "run_dir": run_dir,
        "checkpoint": checkpoint,
        "split": split,
        "group_by": group_by,
        "layers": [{"index": i, "kind": kinds[i]} for i in layers],
        "samples": [
            {
                "batch": v.batch,
                "sample": v.sample,
                "user_id": v.user_id,
                "targets": {s: int((v.scenarios == s).sum()) for s in dict.fromkeys(v.scenarios)},
                "history": int((v.kinds == TokenKind.HISTORY).sum()),
                "realtime": int((v.kinds == TokenKind.REALTIME).sum()),
            }
            for v in views[:num_samples]
        ],
        "table_samples": len(views),
        "scenarios": [s for s in scenarios if any((v.scenarios == s).any() for v in views)],
        "match": {
            s: {"candidate": m.candidate_key, "sequence": list(m.sequence_keys), "source": m.source}
            for s, m in matches.items()
        },
        "block_means": {str(i): block_means(views, i) for i in layers},
        "match_means": {str(i): match_means(views, i) for i in layers},
        "reconstruction_error": {str(i): max(v.reconstruction[i] for v in views) for i in layers},
        "figures": [],
    }


def _ints(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer indices, e.g. 0,-1") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``heatmap`` subcommand's arguments."""
    parser.add_argument("--run-dir", required=True, help="a mtfm_rec.train run directory")
    parser.add_argument(
        "--layers", default="0,-1", help="HTA layer indices, negative from the end (default 0,-1)"
    )
    parser.add_argument("--samples", type=int, default=4, help="samples to show (default 4)")
    parser.add_argument("--out", default="", help="output directory (default <run-dir>/heatmap)")
    parser.add_argument(
        "--table-samples",
        type=int,
        default=DEFAULT_TABLE_SAMPLES,
        help=f"samples the tables average over (default {DEFAULT_TABLE_SAMPLES}; at least --samples)",
    )
    parser.add_argument("--split", default="test", help="split the samples come from (default test)")
    parser.add_argument("--group-by", default=None, help="group H/R columns by this sequence feature's value")
    parser.add_argument(
        "--match",
        action="append",
        default=[],
        help="KEY=FEATURE: candidate feature exp/<s>/<g>/<f> or bag/<s>/<g>/<f> (<s> may be *) against "
        "sequence feature <f> or seq/<q>/<f>; repeatable (default: see the module docstring)",
    )
    parser.add_argument(
        "--checkpoint", default="best", help="best (default), latest or a checkpoint directory"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Runs :func:`heatmap` for parsed arguments; a known error is one line and exit code 2."""
    from mtfm_rec.serve.subgraph import ServingError

    try:
        result = heatmap(
            args.run_dir,
            args.out or None,
            _ints(args.layers),
            args.samples,
            args.split,
            args.group_by,
            args.match,
            args.table_samples,
            args.checkpoint,
        )
    except (ValueError, ServingError, FileNotFoundError) as exc:
        print(f"[experiments] heatmap error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    out = os.path.dirname(result["figures"][0])
    print(
        f"[experiments] wrote {out}/heatmap.md, heatmap.json, "
        + ", ".join(os.path.basename(f) for f in result["figures"]),
        flush=True,
    )
    return 0
