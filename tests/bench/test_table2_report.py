"""The ``table2`` bench section: the paper's Table 2 shape from a comparison's compare.json, and
the check of the paper's pattern (MTFM >= every baseline in every column)."""

from __future__ import annotations

import json

import pytest

from mtfm_rec.bench import table2


def _cell(auc: float, gauc: float = 0.7) -> dict:
    return {
        "seeds": 1.0,
        "auc_mean": auc,
        "auc_std": 0.0,
        "gauc_mean": gauc,
        "gauc_std": 0.0,
        "logloss_mean": 0.5,
        "logloss_std": 0.0,
    }


def _write(tmp_path, summary: dict, models: list) -> None:
    compare = {
        "config": "configs/ml1m_genre.yaml",
        "overrides": ["data.raw=x"],
        "models": models,
        "seeds": [0],
        "fit_seconds": 600.0,
        "jobs": [{"model": m, "seed": "0", "best_step": 500, "max_steps": 5000} for m in models],
        "summary": summary,
    }
    (tmp_path / "compare.json").write_text(json.dumps(compare))


def test_lists_each_column_where_a_baseline_beats_mtfm(tmp_path, monkeypatch) -> None:
    summary = {
        "star": {"drama/click": _cell(0.80, 0.71), "drama/like": _cell(0.82), "all/click": _cell(0.79)},
        "mtfm": {"drama/click": _cell(0.78, 0.72), "drama/like": _cell(0.83), "all/click": _cell(0.80)},
    }
    _write(tmp_path, summary, ["star", "mtfm"])
    monkeypatch.setenv("MTFM_TABLE2_DIR", str(tmp_path))
    text = table2.render(table2.run(quick=False))
    rows = [line for line in text.splitlines() if line.startswith("| mtfm") or line.startswith("| star")]
    assert rows[0].startswith("| mtfm")  # ours first, whatever the parts' order
    assert "| mtfm | <u>0.7800</u> | **0.7200** | **0.8300** |" in text
    assert "- AUC: MTFM >= every baseline in 1 of 2 columns; below the best baseline in:" in text
    assert (
        "  - drama/click: star 0.8000 against MTFM 0.7800 (-0.0200, beyond the rows' std summed, 0.0000)"
        in text
    )
    assert "- GAUC: MTFM >= every baseline in 2 of 2 columns." in text  # a tie is not a loss
    assert "all/click" not in text.split("The paper's pattern")[1].split("Training time")[0]


def test_refuses_a_comparison_without_mtfm(tmp_path, monkeypatch) -> None:
    _write(tmp_path, {"star": {"drama/click": _cell(0.8)}}, ["star"])
    monkeypatch.setenv("MTFM_TABLE2_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="no mtfm row"):
        table2.run(quick=False)


def test_names_the_target_when_nothing_was_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MTFM_TABLE2_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="run `make compare-genre` first"):
        table2.run(quick=False)


def test_plot_draws_every_column(tmp_path, monkeypatch) -> None:
    summary = {m: {"drama/click": _cell(0.8), "all/click": _cell(0.79)} for m in ("mtfm", "mmoe")}
    _write(tmp_path, summary, ["mtfm", "mmoe"])
    monkeypatch.setenv("MTFM_TABLE2_DIR", str(tmp_path))
    path = tmp_path / "t2.png"
    table2.plot(table2.run(quick=False), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_gap_inside_the_seeds_spread_is_marked_within(tmp_path, monkeypatch) -> None:
    ours = _cell(0.800) | {"seeds": 2.0, "auc_std": 0.004}
    summary = {"mtfm": {"drama/click": ours}, "star": {"drama/click": _cell(0.803)}}
    _write(tmp_path, summary, ["mtfm", "star"])
    monkeypatch.setenv("MTFM_TABLE2_DIR", str(tmp_path))
    text = table2.render(table2.run(quick=False))
    assert (
        "  - drama/click: star 0.8030 against MTFM 0.8000 (-0.0030, within the rows' std summed, 0.0040)"
        in text
    )


def test_the_heading_names_where_the_jobs_trained_and_the_report_was_assembled(tmp_path, monkeypatch) -> None:
    from mtfm_rec.bench.__main__ import measured_line

    _write(tmp_path, {"mtfm": {"drama/click": _cell(0.8)}}, ["mtfm"])
    monkeypatch.setenv("MTFM_TABLE2_DIR", str(tmp_path))
    here = {"cpu": "Intel Xeon", "cores": 2, "date": "d", "torch": "t"}
    result = {**table2.run(quick=False), "machine": here}
    assert measured_line(table2, result) == (
        "Jobs trained on a machine not recorded; report assembled d on Intel Xeon (2 cores), torch t."
    )
