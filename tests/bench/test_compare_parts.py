"""Parts of one comparison merged (``mtfm_rec.bench.compare_parts``): a row run over more seeds
later is the row one run over all its seeds would have given."""

from __future__ import annotations

import numpy as np
import pytest

from mtfm_rec.bench.compare_parts import measured, merge_parts, model_seeds, part_commands
from mtfm_rec.experiments.compare import summarize

KEYS = ("d0/click", "all/click")


def _metrics(seed: int, model: str) -> dict:
    """A seed's test metrics, different for every seed, key and model."""
    rng = np.random.default_rng(seed * 7 + len(model))
    return {
        k: {"auc": 0.8 + rng.normal(0, 0.01), "gauc": 0.7 + rng.normal(0, 0.01), "logloss": 0.5} for k in KEYS
    }


def _part(models: list, seeds: list, config: str = "", **extra) -> dict:
    rows = {(m, str(s)): _metrics(s, m) for m in models for s in seeds}
    return {
        "config": "c.yaml",
        "overrides": ["a=1"],
        "models": models,
        "seeds": seeds,
        "jobs": [{"model": m, "seed": str(s), "fit_seconds": 60.0} for m in models for s in seeds],
        "summary": summarize(rows, KEYS),
        "model_configs": {m: config for m in models} if config else {},
        "fit_seconds": 60.0 * len(models) * len(seeds),
        **extra,
    }


def test_new_seeds_join_a_row_as_one_run_over_all_seeds_would() -> None:
    merged = merge_parts(
        [("one", _part(["mtfm", "star", "mmoe"], [0, 1])), ("two", _part(["mtfm", "star"], [2]))]
    )
    at_once = _part(["mtfm", "star"], [0, 1, 2])["summary"]
    assert merged["models"] == ["mtfm", "star", "mmoe"]
    for model in ("mtfm", "star"):
        for key in KEYS:
            assert merged["summary"][model][key] == pytest.approx(at_once[model][key], rel=1e-12, abs=1e-15)
    assert merged["summary"]["mmoe"] == _part(["mmoe"], [0, 1])["summary"]["mmoe"]
    assert model_seeds(merged) == {"mtfm": [0, 1, 2], "star": [0, 1, 2], "mmoe": [0, 1]}
    assert [p["seeds"] for p in merged["parts"]] == [[0, 1], [2]]
    assert len([j for j in merged["jobs"] if j["model"] == "mtfm"]) == 3


def test_a_merge_merges_again_the_same_way() -> None:
    """A published report (the merge of two parts) joined by a third part equals the three at once."""
    parts = [
        ("one", _part(["mtfm"], [0])),
        ("two", _part(["mtfm", "star"], [1])),
        ("three", _part(["star"], [2])),
    ]
    published = merge_parts(parts[:2])
    again = merge_parts([("published.json", published), parts[2]])
    at_once = merge_parts(parts)["summary"]
    for model in ("mtfm", "star"):
        for key in KEYS:
            assert again["summary"][model][key] == pytest.approx(at_once[model][key])
    assert model_seeds(again) == {"mtfm": [0, 1], "star": [1, 2]}


def test_a_seed_already_in_the_row_is_refused() -> None:
    with pytest.raises(ValueError, match=r"two: model star seeds \[1\] are already in an earlier part"):
        merge_parts([("one", _part(["mtfm", "star"], [0, 1])), ("two", _part(["star"], [1, 2]))])


def test_seeds_of_one_row_need_one_model_config() -> None:
    with pytest.raises(ValueError, match=r"two: model mtfm was trained with --model-config 'm.yaml'"):
        merge_parts([("one", _part(["mtfm"], [0])), ("two", _part(["mtfm"], [1], config="m.yaml"))])


def test_a_rerun_still_replaces_the_row() -> None:
    merged = merge_parts([("one", _part(["mtfm"], [0, 1])), ("two", _part(["mtfm"], [1, 2]))], rerun=["mtfm"])
    assert merged["summary"]["mtfm"] == _part(["mtfm"], [1, 2])["summary"]["mtfm"]
    assert model_seeds(merged) == {"mtfm": [1, 2]}


def test_parts_may_differ_in_where_files_go_but_not_in_what_is_trained() -> None:
    first = _part(["mtfm"], [0], overrides=["a=1", "data.cache_dir=/x"])
    moved = _part(["star"], [0], overrides=["a=1", "data.cache_dir=/y", "train.progress_bar=false"])
    moved["overrides"] += ["train.log_every=50", "train.tensorboard=false"]  # what is logged
    merged = merge_parts([("one", first), ("two", moved)])
    assert merged["models"] == ["mtfm", "star"]
    assert [p["overrides"] for p in merged["parts"]] == [first["overrides"], moved["overrides"]]
    assert "data.cache_dir=/y" in part_commands(merged)[2]  # each part's command as it was run
    with pytest.raises(ValueError, match="two: overrides=.*differs from one's"):
        merge_parts([("one", first), ("two", _part(["star"], [0], overrides=["a=2", "data.cache_dir=/x"]))])


def test_the_heading_names_every_parts_machine_not_only_the_newest() -> None:
    amd = {"cpu": "AMD EPYC", "cores": 2, "date": "2026-11-22"}
    intel = {"cpu": "Intel Xeon", "cores": 2, "date": "2026-12-05"}
    merged = merge_parts(
        [
            ("one", _part(["mtfm", "star"], [0], machine=amd)),
            ("two", _part(["mtgr"], [0], machine={**amd, "date": "2026-12-04"})),
            ("three", _part(["mtgr"], [1], machine=intel)),
        ]
    )
    here = {**intel, "torch": "2.13.0+cpu"}
    line = measured({"compare": merged, "machine": here})
    assert line == (
        "Jobs trained on AMD EPYC (2 cores) (2026-11-22, 2026-12-04); Intel Xeon (2 cores) "
        "(2026-12-05); report assembled 2026-12-05 on Intel Xeon (2 cores), torch 2.13.0+cpu."
    )
