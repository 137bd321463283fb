"""The id regression, the floor of any dataset: the same numbers as the synthetic references'
``lr_features`` where both apply, and the splits read as the trainer reads them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtfm_rec.bench import references
from mtfm_rec.bench.id_regression import id_regression_metrics
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.data.synthetic import generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/bench/conftest.py


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, DatasetSchema]:
    root = tmp_path_factory.mktemp("id_regression")
    return root, generate(str(root), num_users=300, num_days=4, seed=3, shared_embeddings=False)


def test_same_test_numbers_as_the_references_lr_features(small: Tuple[Path, DatasetSchema]) -> None:
    root, schema = small
    ours = id_regression_metrics(str(root))
    theirs = references.reference_metrics(str(root), names=["lr_features"])["lr_features"]
    for key, metrics in theirs.items():
        assert ours["test"][key]["auc"] == pytest.approx(metrics["auc"], abs=1e-9), key
        assert ours["test"][key]["count"] == metrics["count"]
    assert set(ours["valid"]) == set(ours["test"]) == {*theirs, "all/click", "all/order"}
    # the pooled row is over every scenario's test rows of the task
    tasks = {s.name: s.tasks for s in schema.scenarios}
    clicks = sum(ours["test"][f"{s}/click"]["count"] for s, t in tasks.items() if "click" in t)
    assert ours["test"]["all/click"]["count"] == clicks


def _set_split(root: Path, scenario: str, value: int | None) -> None:
    """Every exposure of the scenario gets ``split = value`` (None: a null, "split by time")."""
    for path in sorted((root / "exposures" / scenario).glob("*.parquet")):
        table = pq.read_table(path)
        table = table.drop_columns([c for c in ("split",) if c in table.column_names])
        pq.write_table(table.append_column("split", pa.array([value] * table.num_rows, pa.int64())), path)


def test_a_split_column_wins_over_time(small: Tuple[Path, DatasetSchema], tmp_path: Path) -> None:
    root, _ = small
    copy = tmp_path / "all_train"
    shutil.copytree(root, copy)
    _set_split(copy, "search", 0)  # every search exposure is a training one: nothing to score
    with pytest.raises(ValueError, match=r"exposures/search has no valid/test exposure"):
        id_regression_metrics(str(copy))

    unset = tmp_path / "unset"
    shutil.copytree(root, unset)
    _set_split(unset, "search", None)  # null: split by time, as without the column
    assert id_regression_metrics(str(unset))["test"]["search/click"] == pytest.approx(
        id_regression_metrics(str(root))["test"]["search/click"]
    )
