"""The ``baselines`` bench section: it reports a comparison's compare.json beside the published
Table 7, and refuses to report one that was not run."""

from __future__ import annotations

import json
import os

import pytest

from mtfm_rec.bench import baselines
from mtfm_rec.bench.compare_parts import best_steps


def _cell(auc: float) -> dict:
    return {
        "auc_mean": auc,
        "auc_std": 0.001,
        "gauc_mean": 0.7,
        "gauc_std": 0.0,
        "logloss_mean": 0.52,
        "logloss_std": 0.0,
    }


@pytest.fixture(autouse=True)
def floor(monkeypatch) -> dict:
    """The id regression's numbers (tests/bench/test_id_regression.py tests them) for a
    comparison whose data is not on disk."""
    metrics = {k: {"auc": 0.79, "logloss": 0.54} for k in ("all/click", "d0/click", "d1/click", "d2/click")}
    monkeypatch.setattr(baselines, "_floor", lambda compare: metrics)
    return metrics


def test_report_puts_our_rows_beside_the_published_ones(tmp_path, monkeypatch) -> None:
    keys = {f"d{i}/click": _cell(0.80 + i / 100) for i in range(3)} | {"all/click": _cell(0.8123)}
    compare = {
        "config": "c.yaml",
        "models": ["mtfm"],
        "seeds": [0],
        "overrides": [],
        "summary": {"mtfm": keys},
    }
    (tmp_path / "compare.json").write_text(json.dumps(compare))
    monkeypatch.setenv("MTFM_COMPARE_DIR", str(tmp_path))
    text = baselines.render(baselines.run(quick=False))
    ours = next(line for line in text.splitlines() if line.startswith("| mtfm (ours)"))
    assert ours.split(" | ")[1:6] == [
        "0",
        "0.8123 ± 0.0010",
        "0.8000 ± 0.0010",
        "0.8100 ± 0.0010",
        "0.8200 ± 0.0010",
    ]
    assert "| M2M (published) | - | 0.8115 | 0.8111 | 0.8163 | 0.8057 | 0.5213 |" in text
    assert "| logistic regression on ids (ours) | - | 0.7900 | 0.7900 | 0.7900 | 0.7900 | 0.5400 |" in text


def test_the_floor_needs_the_comparisons_data(tmp_path, monkeypatch) -> None:
    monkeypatch.undo()  # the real _floor
    compare = {"config": "configs/ml1m_swr.yaml", "overrides": [f"data.raw={tmp_path}/absent"]}
    with pytest.raises(FileNotFoundError, match=r"absent: the comparison's data.raw is not here"):
        baselines._floor(compare)


def test_no_comparison_no_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MTFM_COMPARE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run `make compare` first"):
        baselines.run(quick=False)


def _part(tmp_path, name: str, models: list, overrides: list, cpu: str, seeds: tuple = (0,)) -> str:
    keys = {f"d{i}/click": _cell(0.80) for i in range(3)} | {"all/click": _cell(0.81)}
    part = {
        "config": "c.yaml",
        "models": models,
        "seeds": list(seeds),
        "overrides": overrides,
        "fit_seconds": 600.0,
        "jobs": [{"model": m, "fit_seconds": 600.0 / len(models)} for m in models],
        "machine": {"cpu": cpu, "cores": 2, "date": "2026-12-02"},
        "summary": {m: keys for m in models},
    }
    (tmp_path / name).mkdir()
    (tmp_path / name / "compare.json").write_text(json.dumps(part))
    return str(tmp_path / name)


def test_parts_of_one_comparison_are_reported_together(tmp_path, monkeypatch) -> None:
    one = _part(tmp_path, "one", ["mtfm", "star"], ["a=1"], "Xeon")
    two = _part(tmp_path, "two", ["mtgr"], ["a=1"], "EPYC")
    monkeypatch.setenv("MTFM_COMPARE_DIR", os.pathsep.join([one, two]))
    text = baselines.render(baselines.run(quick=False))
    models = [line.split(" | ")[0] for line in text.splitlines() if "(ours)" in line]
    assert models == [
        "| mtfm (ours)",
        "| star (ours)",
        "| mtgr (ours)",
        "| logistic regression on ids (ours)",
    ]
    assert "--models mtfm,star --seeds 0 a=1`" in text and "--models mtgr --seeds 0 a=1`" in text
    assert "- mtfm, star: 10 min on Xeon (2 cores), 2026-12-02" in text
    assert "- mtgr: 10 min on EPYC (2 cores), 2026-12-02" in text


@pytest.mark.parametrize(
    "second, message",
    [
        ({"models": ["mtgr"], "overrides": ["a=2"]}, "overrides=.*differs from"),
        (
            {"models": ["star"], "overrides": ["a=1"]},
            r"model star seeds \[0\] are already in an earlier part",
        ),
    ],
)
def test_parts_that_are_not_one_comparison_are_refused(tmp_path, monkeypatch, second, message) -> None:
    one = _part(tmp_path, "one", ["mtfm", "star"], ["a=1"], "Xeon")
    two = _part(tmp_path, "two", second["models"], second["overrides"], "EPYC")
    monkeypatch.setenv("MTFM_COMPARE_DIR", os.pathsep.join([one, two]))
    with pytest.raises(ValueError, match=message):
        baselines.run(quick=False)


def test_a_new_part_joins_a_published_report(tmp_path, monkeypatch) -> None:
    """An earlier report's JSON stands for its parts (their run directories are gone), which keep
    their own commands and machines; the new part's are added after them."""
    one = _part(tmp_path, "one", ["mtfm", "star"], ["a=1"], "Xeon")
    two = _part(tmp_path, "two", ["mtgr"], ["a=1"], "EPYC")
    monkeypatch.setenv("MTFM_COMPARE_DIR", os.pathsep.join([one, two]))
    published = tmp_path / "baselines.json"
    published.write_text(json.dumps(baselines.run(quick=False)))
    three = _part(tmp_path, "three", ["onetrans"], ["a=1"], "EPYC")
    monkeypatch.setenv("MTFM_COMPARE_DIR", os.pathsep.join([str(published), three]))
    compare = baselines.run(quick=False)["compare"]
    assert compare["models"] == ["mtfm", "star", "mtgr", "onetrans"]
    assert [p["models"] for p in compare["parts"]] == [["mtfm", "star"], ["mtgr"], ["onetrans"]]
    assert compare["parts"][0]["source"] == os.path.join(one, "compare.json")
    again = _part(tmp_path, "again", ["mtgr"], ["a=1"], "EPYC")
    monkeypatch.setenv("MTFM_COMPARE_DIR", os.pathsep.join([str(published), again]))
    with pytest.raises(ValueError, match=r"model mtgr seeds \[0\] are already in an earlier part"):
        baselines.run(quick=False)


def test_a_model_rerun_with_its_own_config_replaces_its_row(tmp_path, monkeypatch) -> None:
    """Only when asked: the re-run's row and command replace the earlier ones, and the earlier
    part keeps its other models with their training time alone."""
    one = _part(tmp_path, "one", ["mtfm", "star"], ["a=1"], "Xeon")
    tuned = _part(tmp_path, "tuned", ["mtfm"], ["a=1"], "EPYC")
    path = os.path.join(tuned, "compare.json")
    part = json.load(open(path))
    part["summary"]["mtfm"]["all/click"] = _cell(0.8321)
    part["model_configs"] = {"mtfm": "configs/m_mtfm.yaml"}
    json.dump(part, open(path, "w"))
    monkeypatch.setenv("MTFM_COMPARE_DIR", os.pathsep.join([one, tuned]))
    with pytest.raises(ValueError, match="MTFM_COMPARE_RERUN=<models> lets it replace the row"):
        baselines.run(quick=False)
    monkeypatch.setenv("MTFM_COMPARE_RERUN", "mtfm")
    result = baselines.run(quick=False)
    assert result["compare"]["models"] == ["star", "mtfm"]
    text = baselines.render(result)
    assert "| mtfm (ours, m_mtfm.yaml) | 0 | 0.8321 ± 0.0010 |" in text
    assert "--models star --seeds 0 a=1`" in text
    assert "--models mtfm --seeds 0 --model-config mtfm=configs/m_mtfm.yaml a=1`" in text
    assert "- star: 5 min on Xeon (2 cores)" in text and "- mtfm: 10 min on EPYC (2 cores)" in text


def test_a_part_with_more_seeds_says_so_in_its_rows_and_command(tmp_path, monkeypatch) -> None:
    """The close models re-run over three seeds beside one-seed rows: each row names its seeds,
    each part's command its own, and a report of the merge merges again the same way."""
    one = _part(tmp_path, "one", ["mtfm", "star", "mmoe"], ["a=1"], "Xeon")
    three = _part(tmp_path, "three", ["mtfm", "star"], ["a=1"], "EPYC", seeds=(0, 1, 2))
    path = os.path.join(three, "compare.json")
    part = json.load(open(path))
    part["jobs"] = [
        {"model": m, "seed": str(seed), "fit_seconds": 100.0, "best_step": best, "max_steps": 500}
        for m, bests in (("mtfm", (500, 250, 500)), ("star", (250, 250, 300)))
        for seed, best in enumerate(bests)
    ]
    json.dump(part, open(path, "w"))
    monkeypatch.setenv("MTFM_COMPARE_DIR", os.pathsep.join([one, three]))
    monkeypatch.setenv("MTFM_COMPARE_RERUN", "mtfm,star")
    result = baselines.run(quick=False)
    assert result["compare"]["seeds"] == [0, 1, 2]
    text = baselines.render(result)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in text.splitlines() if "(ours" in line}
    assert rows == {
        "mtfm (ours)": "0,1,2",
        "star (ours)": "0,1,2",
        "mmoe (ours)": "0",
        "logistic regression on ids (ours)": "-",
    }
    assert "--models mmoe --seeds 0 a=1`" in text and "--models mtfm,star --seeds 0,1,2 a=1`" in text
    assert "- mtfm: seed0 500*, seed1 250, seed2 500*" in text  # * = at the cap: not converged
    assert "- star: seed0 250, seed1 250, seed2 300" in text and "- mmoe: not recorded" in text
    published = tmp_path / "baselines.json"
    published.write_text(json.dumps(result))
    monkeypatch.setenv("MTFM_COMPARE_DIR", str(published))
    assert baselines.render(baselines.run(quick=False)) == text


def test_best_steps_names_the_jobs_an_older_part_did_not_record() -> None:
    """A later part's steps are listed beside an older part's jobs that kept none."""
    jobs = [
        {"model": "mtgr", "seed": "0", "scenario": "d0"},
        {"model": "mtgr", "seed": "1", "scenario": "d0", "best_step": 750, "max_steps": 5000},
        {"model": "mtgr", "seed": "2", "scenario": "d0", "best_step": 5000, "max_steps": 5000},
        {"model": "star", "seed": "0"},
    ]
    assert best_steps(jobs, "mtgr") == "seed0 d0 not recorded, seed1 d0 750, seed2 d0 5000*"
    assert best_steps(jobs, "star") == "not recorded"
    assert best_steps(jobs, "mmoe") == "not recorded"
