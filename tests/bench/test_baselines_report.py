"""The ``baselines`` bench section: it reports a comparison's compare.json beside the published
Table 7, and refuses to report one that was not run."""

from __future__ import annotations

import json

import pytest

from mtfm_rec.bench import baselines


def _cell(auc: float) -> dict:
    return {
        "auc_mean": auc,
        "auc_std": 0.001,
        "gauc_mean": 0.7,
        "gauc_std": 0.0,
        "logloss_mean": 0.52,
        "logloss_std": 0.0,
    }


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
    assert ours.split(" | ")[1:5] == [
        "0.8123 ± 0.0010",
        "0.8000 ± 0.0010",
        "0.8100 ± 0.0010",
        "0.8200 ± 0.0010",
    ]
    assert "| M2M (published) | 0.8115 | 0.8111 | 0.8163 | 0.8057 | 0.5213 |" in text


def test_no_comparison_no_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MTFM_COMPARE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run `make compare` first"):
        baselines.run(quick=False)
