"""``python -m mtfm_rec.experiments compare``: the job plan, the statistics and the table, and an
end-to-end smoke comparison that is killed (a job's result removed) and resumed."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mtfm_rec.config import ConfigError
from mtfm_rec.data.synthetic import generate
from mtfm_rec.experiments import compare
from mtfm_rec.experiments.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "mtfm_small.yaml")


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("compare_raw"))
    generate(path, num_users=300, num_days=4, seed=5, shared_embeddings=False)
    return path


def test_plan_runs_per_scenario_models_once_per_scenario(raw) -> None:
    jobs = compare.plan(CONFIG, ["mtfm", "mmoe"], [0, 1], [f"data.raw={raw}", "train.eval_every=10"])
    names = [j.name for j in jobs]
    assert names == [
        "mtfm/seed0",
        "mtfm/seed1",
        *[f"mmoe/seed{k}/{s}" for k in (0, 1) for s in ("feed", "search", "coupon")],
    ]
    one = jobs[2].overrides
    assert "model.name=mmoe" in one and "train.seed=0" in one and "data.loader.seed=0" in one
    assert "data.scenarios=[feed]" in one and not any("scenarios" in o for o in jobs[0].overrides)


def test_plan_refuses_what_it_cannot_compare_fairly(raw) -> None:
    with pytest.raises(ConfigError, match=r"unknown \['dcn'\]"):
        compare.plan(CONFIG, ["mtfm", "dcn"], [0], [f"data.raw={raw}", "train.eval_every=10"])
    with pytest.raises(ConfigError, match="train.eval_every=0; an experiment chooses each job's checkpoint"):
        compare.plan(CONFIG, ["mtfm"], [0], [f"data.raw={raw}"])
    with pytest.raises(ConfigError, match="at least one seed"):
        compare.plan(CONFIG, ["mtfm"], [], [f"data.raw={raw}", "train.eval_every=10"])


def test_a_model_config_may_change_the_model_only(raw, tmp_path) -> None:
    """A model's own config (its tuned model section) runs that model's jobs; one that changes the
    data or the budget is refused, naming the key, since the comparison would not be fair."""
    overrides = [f"data.raw={raw}", "train.eval_every=10"]
    wide = tmp_path / "wide.yaml"
    wide.write_text(f"base: {CONFIG}\nmodel:\n  d_model: 48\n")
    jobs = compare.plan(CONFIG, ["mtfm", "star"], [0], overrides, {"mtfm": str(wide)})
    assert [(j.name, j.config) for j in jobs] == [("mtfm/seed0", str(wide)), ("star/seed0", CONFIG)]
    longer = tmp_path / "longer.yaml"
    longer.write_text(f"base: {CONFIG}\ntrain:\n  max_steps: 99999\n")
    with pytest.raises(ConfigError, match=rf"--model-config mtfm={longer}: .*train.max_steps: 99999, not"):
        compare.plan(CONFIG, ["mtfm"], [0], overrides, {"mtfm": str(longer)})
    with pytest.raises(ConfigError, match=r"--model-config for \['star'\], which --models does not list"):
        compare.plan(CONFIG, ["mtfm"], [0], overrides, {"star": str(wide)})


def _m(auc: float, gauc: float, logloss: float = 0.5) -> dict:
    return {"auc": auc, "gauc": gauc, "logloss": logloss}


def test_summary_is_mean_and_sample_std_over_seeds() -> None:
    rows = {("a", "0"): {"s/t": _m(0.70, 0.60)}, ("a", "1"): {"s/t": _m(0.74, 0.64)}}
    cell = compare.summarize(rows, ["s/t"])["a"]["s/t"]
    assert cell["auc_mean"] == pytest.approx(0.72) and cell["gauc_mean"] == pytest.approx(0.62)
    assert cell["auc_std"] == pytest.approx(math.sqrt(2 * 0.02**2)) and cell["seeds"] == 2
    with pytest.raises(ValueError, match="a seed has no auc"):
        compare.summarize({("a", "0"): {"s/t": _m(math.nan, 0.5)}}, ["s/t"])
    with pytest.raises(ValueError, match="no test metrics in 1 of 2"):
        compare.summarize({("a", "0"): {"s/t": _m(0.7, 0.5)}, ("a", "1"): {}}, ["s/t"])


def test_table_marks_best_bold_and_second_underlined() -> None:
    rows = {(m, "0"): {"s/t": _m(auc, 0.5)} for m, auc in (("x", 0.71), ("y", 0.73), ("z", 0.72))}
    table = compare.markdown_table(compare.summarize(rows, ["s/t"]), ["s/t"])
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "**0.7300**" in lines["y"] and "<u>0.7200</u>" in lines["z"]  # one seed: no ±
    assert "**" not in lines["x"].split("|")[2] and "<u>" not in lines["x"].split("|")[2]
    two = {**rows, ("y", "1"): {"s/t": _m(0.75, 0.5)}}
    table = compare.markdown_table(compare.summarize(two, ["s/t"]), ["s/t"])
    assert f"**0.7400 ± {math.sqrt(2 * 0.01**2):.4f}**" in table


def test_plot_legend_names_each_models_seed_count(tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    rows = {
        ("a", "0"): {"s/t": _m(0.7, 0.6)},
        ("a", "1"): {"s/t": _m(0.72, 0.6)},
        ("b", "0"): {"s/t": _m(0.71, 0.6)},
    }
    labels = []
    monkeypatch.setattr(
        plt, "close", lambda fig: labels.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    )
    compare.plot(compare.summarize(rows, ["s/t"]), ["s/t"], str(tmp_path / "c.png"), "t")
    assert labels == ["a (2 seeds)", "b (1 seed)"]  # a bar without an error bar is one seed
    assert (tmp_path / "c.png").stat().st_size > 0


def test_pooled_metrics_are_computed_over_every_scenarios_rows(tmp_path) -> None:
    from mtfm_rec.experiments.jobs import Job
    from mtfm_rec.training.metrics import compute_key_metrics, write_predictions

    rng = np.random.default_rng(0)
    jobs, all_rows = [], {"score": [], "label": [], "user_id": []}
    for s in ("a", "b"):
        job = Job(f"m/seed0/{s}", "c.yaml", [], {"model": "m", "seed": "0", "scenario": s})
        rows = {
            k: {
                "score": rng.random(50).astype(np.float32),
                "label": rng.integers(0, 2, 50),
                "user_id": rng.integers(0, 5, 50),
                "ts": np.zeros(50, np.int64),
            }
            for k in (f"{s}/click", f"{'b' if s == 'a' else 'a'}/click")
        }
        write_predictions(str(tmp_path / job.name / "predictions.parquet"), rows)
        jobs.append(job)
        for k in all_rows:
            all_rows[k].append(rows[f"{s}/click"][k])  # only the job's own scenario counts
    got = compare.pooled_rows(jobs, str(tmp_path))[("m", "0")]["all/click"]
    want = compute_key_metrics(*(np.concatenate(all_rows[k]) for k in ("score", "label", "user_id")))
    assert got["auc"] == pytest.approx(want["auc"]) and got["count"] == 100


def test_smoke_comparison_resumes_only_what_is_missing(raw, tmp_path, capsys) -> None:
    """Two models (one per scenario), one seed, tiny data, two jobs at a time (the data is
    aggregated once before them); a removed result is the only re-run."""
    argv = [
        "compare",
        "--parallel",
        "2",
        "--config",
        CONFIG,
        "--models",
        "mtfm,mmoe",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "smoke",
        f"data.raw={raw}",
        f"data.cache_dir={tmp_path}/cache",
        "train.max_steps=20",
        "train.eval_every=10",
        "train.lr_warmup_steps=5",
        "train.progress_bar=false",
        "train.plots=false",
        "train.tensorboard=false",
        "data.aggregation.progress=false",
        "train.save_predictions=true",
    ]
    assert main(argv) == 0
    root = tmp_path / "smoke"
    report = json.loads((root / "compare.json").read_text())
    assert set(report["summary"]) == {"mtfm", "mmoe"}
    assert report["machine"]["cores"] == os.cpu_count()  # the times are of this machine
    # each job says where it stopped and which validation pass chose it (a best step at the cap
    # is a run the budget stopped while it improved)
    assert {(j["steps"], j["max_steps"]) for j in report["jobs"]} == {(20, 20)}
    assert {j["best_step"] for j in report["jobs"]} <= {10, 20}
    scenario_keys = ["feed/click", "feed/order", "search/click", "coupon/click", "coupon/order"]
    assert list(report["summary"]["mmoe"]) == [*scenario_keys, "all/click", "all/order"]
    assert "Pooled over scenarios" in (root / "compare.md").read_text()
    assert (root / "compare.png").stat().st_size > 0 and "| mmoe |" in (root / "compare.md").read_text()
    os.remove(root / "mmoe" / "seed0" / "search" / "metrics.json")  # as if killed before the end
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 of 4 jobs already finished" in out and "[1/1] mmoe/seed0/search" in out, out
    # The same name with another budget would report the old runs as the new config's: refused
    # before anything runs, naming the job and the setting.
    assert main([a if a != "train.max_steps=20" else "train.max_steps=30" for a in argv]) == 2
    err = capsys.readouterr().err
    assert "job mtfm/seed0:" in err and "train.max_steps: 20 then, 30 now" in err, err
