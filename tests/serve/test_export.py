"""Export of a scenario subgraph: torch.export with dynamic shapes, the AOTInductor package,
its metadata, and the packages it refuses.

The AOTInductor compile is the slow part (about half a minute on a small CPU): it runs once per
module (``package`` fixture), for the smallest MTFM that still has a history and a real-time
sequence, and a scenario with two multi-hot features (so every kind of dynamic dimension is
there: B, each L_q, M, each K_f). Requests are built by hand so that each size is chosen.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from serve_helpers import small_model

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model import MTFM
from mtfm_rec.model.examples import trained_time_bias
from mtfm_rec.serve.export import (
    ExportedScorer,
    PackageError,
    export_program,
    export_scenario,
    load_package,
    read_metadata,
    serving_metadata,
)
from mtfm_rec.serve.predictor import Predictor, eager_scorer
from mtfm_rec.serve.request import Request, ScenarioInputs, SequenceContext, collate_requests
from mtfm_rec.serve.subgraph import ScenarioModel, ServingError, extract_subgraph

SCENARIO = "b"
SCHEMA = DatasetSchema.from_dict(
    {
        "name": "export_test",
        "time_unit": "s",
        "sequences": [
            {"name": "orders", "kind": "history", "max_len": 16, "features": {"item": 20, "cat": 5}},
            {"name": "clicks_rt", "kind": "realtime", "max_len": 16, "features": {"item": 20}},
        ],
        "scenarios": [
            {"name": "a", "item_features": {"item": 20}, "tasks": ["click"]},
            {
                "name": SCENARIO,
                "user_features": {"city": 7, "tags": {"size": 4, "pooling": "sum"}},
                "item_features": {"item": 20, "genres": {"size": 6, "pooling": "mean"}},
                "cross_features": {"dist": 3},
                "dense_features": ["price"],
                "tasks": ["click", "order"],
            },
        ],
    }
)
# Sizes of the request batches the program / package is checked on: (requests, longest context
# per sequence, most candidates, widest bag per multi-hot feature); none is the example's.
SHAPES = [(1, (1, 1), 1, (1, 1)), (4, (9, 3), 7, (2, 5)), (2, (0, 6), 3, (4, 1))]
ATOL = 1e-5


def narrow_model(**overrides: Any) -> MTFM:
    """The serving tests' small MTFM, narrower still: the module compiles it once."""
    return small_model(
        SCHEMA,
        **overrides,
        d_model=16,
        tokenizer_hidden=[16],
        target_layers_per_block=1,
        num_heads=2,
        num_kv_heads=1,
        num_experts=2,
        expert_dim=8,
        tower_dim=4,
    )


def _bags(rng: np.random.Generator, m: int, width: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """``m`` jagged bags of at most ``width`` ids (the first exactly ``width``, some empty)."""
    lengths = rng.integers(0, width + 1, m)
    lengths[0] = width
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, rng.integers(0, size + 1, int(lengths.sum())).astype(np.int64)


def make_requests(
    n: int, context: Tuple[int, ...], m: int, bags: Tuple[int, ...], seed: int
) -> List[Request]:
    """``n`` requests of scenario ``SCENARIO``; request 0 has exactly the given sizes (so the
    padded batch has them), the others at most. Real-time actions straddle the request time."""
    rng = np.random.default_rng(seed)
    spec = SCHEMA.scenario(SCENARIO)
    out = []
    for i in range(n):
        t = 1000 + int(rng.integers(0, 50))
        ctx = {}
        for q, width in zip(SCHEMA.ordered_sequences, context):
            length = width if i == 0 else int(rng.integers(0, width + 1))
            hi = 1000 if q.is_history else t + 50
            ts = np.sort(rng.integers(0, hi, length)).astype(np.int64)
            ids = {f: rng.integers(0, size + 1, length).astype(np.int64) for f, size in q.features.items()}
            ctx[q.name] = SequenceContext(ts, ids)
        count = m if i == 0 else int(rng.integers(1, m + 1))
        features = {c: rng.integers(0, size + 1, count).astype(np.int64) for _, c, size in spec.categorical()}
        bag = {c: _bags(rng, count, w, size) for (_, c, size, _), w in zip(spec.multi_hot(), bags)}
        dense = rng.exponential(10.0, (count, len(spec.dense_features))).astype(np.float32)
        cand_ts = np.full(count, t, np.int64)
        out.append(Request(SCENARIO, t, ctx, features, dense, cand_ts, bag, user_id=i))
    return out


def make_inputs(
    n: int, context: Tuple[int, ...], m: int, bags: Tuple[int, ...], seed: int = 1
) -> ScenarioInputs:
    return collate_requests(make_requests(n, context, m, bags, seed), SCHEMA)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max |diff| {diff:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def sub() -> ScenarioModel:
    return extract_subgraph(narrow_model(), SCENARIO)


@pytest.fixture(scope="module")
def package(sub: ScenarioModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one AOTInductor compile of this module (an example of 3 requests)."""
    path = str(tmp_path_factory.mktemp("pkg") / "b.pt2")
    return export_scenario(sub, SCHEMA, make_inputs(3, (5, 4), 4, (3, 2), seed=0), path)


@pytest.fixture(scope="module")
def scorer(package: str) -> ExportedScorer:
    return load_package(package)


# ---------------------------------------------------------------------------- torch.export
@torch.no_grad()
def test_exported_program_matches_eager_on_new_shapes(sub: ScenarioModel) -> None:
    # the example has every dynamic size 1: export must trace a padded copy, not specialise
    program = export_program(sub, make_inputs(1, (1, 1), 1, (1, 1), seed=0))
    module = program.module()
    for n, context, m, bags in SHAPES:
        inputs = make_inputs(n, context, m, bags)
        assert [t.shape[1] for t in inputs.seq_ids] == [max(1, c) for c in context]
        assert_close(module(*inputs.as_args()), sub(*inputs.as_args()))


@torch.no_grad()
def test_the_time_inputs_export_and_match_eager() -> None:
    """The rotary and the time bias (with trained, non-zero coefficients) trace as well."""
    model = narrow_model(time_rotary_pairs=2, time_bias_pairs=3)
    trained_time_bias(model)
    timed = extract_subgraph(model, SCENARIO)
    module = export_program(timed, make_inputs(1, (1, 1), 1, (1, 1), seed=0)).module()
    for n, context, m, bags in SHAPES:
        inputs = make_inputs(n, context, m, bags)
        assert_close(module(*inputs.as_args()), timed(*inputs.as_args()))


def test_export_refuses_an_example_of_another_layout(sub: ScenarioModel) -> None:
    inputs = make_inputs(2, (2, 2), 2, (2, 2))
    inputs.cand_bags = inputs.cand_bags[:1]
    with pytest.raises(ServingError, match=r"example\.cand_bags: 1 bags, scenario 'b' takes 2"):
        export_program(sub, inputs)


# ---------------------------------------------------------------------------- AOTInductor package
@torch.no_grad()
def test_package_matches_eager_on_two_shapes(sub: ScenarioModel, scorer: ExportedScorer) -> None:
    for n, context, m, bags in SHAPES[1:]:
        inputs = make_inputs(n, context, m, bags)
        assert_close(scorer(inputs), sub(*inputs.as_args()))


def test_predictor_on_the_package_scores_like_eager(sub: ScenarioModel, scorer: ExportedScorer) -> None:
    requests = make_requests(5, (6, 4), 5, (3, 3), seed=7)
    served = Predictor(scorer.schema, {scorer.scenario: scorer}, max_batch_requests=3).score(requests)
    eager = Predictor(SCHEMA, {SCENARIO: eager_scorer(sub)}, max_batch_requests=3).score(requests)
    for got, want, r in zip(served, eager, requests):
        assert got.shape == (r.num_candidates, 2)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_metadata_round_trip(sub: ScenarioModel, package: str, scorer: ExportedScorer) -> None:
    assert scorer.scenario == SCENARIO and scorer.tasks == ["click", "order"]
    assert scorer.schema.to_dict() == SCHEMA.to_dict()
    meta = read_metadata(package)
    assert meta == scorer.metadata == serving_metadata(sub, SCHEMA)
    assert (meta.torch_version, meta.bf16, meta.device) == (torch.__version__, False, "cpu")
    layout = meta.layout
    assert [(q["name"], q["kind"], q["features"]) for q in layout["sequences"]] == [
        ("orders", "history", ["item", "cat"]),
        ("clicks_rt", "realtime", ["item"]),
    ]
    assert layout["categorical"] == [
        {"group": "user", "column": "city"},
        {"group": "item", "column": "item"},
        {"group": "cross", "column": "dist"},
    ]
    assert [(b["column"], b["pooling"]) for b in layout["multi_hot"]] == [("tags", "sum"), ("genres", "mean")]
    assert layout["dense"] == ["price"]
    assert layout["flat_inputs"][:2] == ["seq_ids/orders", "seq_ids/clicks_rt"]
    assert layout["flat_inputs"][-5:] == [
        "cand_bags/tags",
        "cand_bags/genres",
        "cand_dense",
        "cand_ts",
        "cand_count",
    ]


def test_scorer_names_the_field_of_a_bad_input(scorer: ExportedScorer) -> None:
    inputs = make_inputs(2, (3, 2), 3, (2, 2))
    bad = ScenarioInputs(**{**vars(inputs), "cand_ids": inputs.cand_ids[..., :2]})
    with pytest.raises(ServingError, match=r"inputs\.cand_ids: axis 2 is 2, the package .*b\.pt2 takes 3"):
        scorer(bad)
    bad = ScenarioInputs(**{**vars(inputs), "cand_ts": inputs.cand_ts[:1]})
    with pytest.raises(ServingError, match=r"inputs\.cand_ts: axis 0 \(B\) is 1, but 2 in inputs\.seq_ids"):
        scorer(bad)
    bad = ScenarioInputs(**{**vars(inputs), "seq_len": inputs.seq_len[:1]})
    with pytest.raises(ServingError, match=r"inputs\.seq_len: 1 tensors, the package .* takes 2"):
        scorer(bad)


def test_metadata_refuses_a_schema_the_subgraph_was_not_built_with(sub: ScenarioModel) -> None:
    raw = SCHEMA.to_dict()
    raw["scenarios"][1]["tasks"] = ["click"]
    with pytest.raises(ServingError, match="subgraph's sequences/features/tasks are not those"):
        serving_metadata(sub, DatasetSchema.from_dict(raw))


# ---------------------------------------------------------------------------- refused packages
def _edited(package: str, dst: str, edit: Callable[[Dict[str, str]], Dict[str, str]]) -> str:
    """A copy of ``package`` whose archive metadata (``<model>_metadata.json``) went through ``edit``."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith(".wrapper_metadata.json"):
                data = json.dumps(edit(json.loads(data))).encode()
            out.writestr(info.filename, data)
    return dst


def test_refuses_a_package_of_another_torch(package: str, tmp_path: Path) -> None:
    path = _edited(
        package, os.path.join(str(tmp_path), "old.pt2"), lambda m: {**m, "mtfm_rec.torch_version": "2.5.1"}
    )
    with pytest.raises(PackageError, match=r"old\.pt2: built by torch 2\.5\.1, this is torch "):
        load_package(path)


def test_refuses_a_package_without_metadata(package: str, tmp_path: Path) -> None:
    def drop(meta: Dict[str, str]) -> Dict[str, str]:
        return {k: v for k, v in meta.items() if not k.startswith("mtfm_rec.")}

    path = _edited(package, os.path.join(str(tmp_path), "bare.pt2"), drop)
    with pytest.raises(PackageError, match=r"bare\.pt2: no mtfm_rec serving metadata"):
        load_package(path)


def test_refuses_a_package_whose_library_disagrees(package: str, tmp_path: Path) -> None:
    path = _edited(
        package, os.path.join(str(tmp_path), "edited.pt2"), lambda m: {**m, "mtfm_rec.scenario": "a"}
    )
    with pytest.raises(
        PackageError, match=r"edited\.pt2: the compiled model's metadata is not the archive's"
    ):
        load_package(path)


def test_refuses_what_is_no_aoti_package(sub: ScenarioModel, tmp_path: Path) -> None:
    missing = os.path.join(str(tmp_path), "missing.pt2")
    with pytest.raises(PackageError, match=r"missing\.pt2: no such package file"):
        load_package(missing)
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    saved = os.path.join(str(tmp_path), "program.pt2")
    torch.export.save(program, saved)  # a .pt2, but an ExportedProgram without a compiled model
    with pytest.raises(PackageError, match=r"program\.pt2: not an AOTInductor \.pt2 package"):
        load_package(saved)
