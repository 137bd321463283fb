"""Reading the raw contract: layout and column validation, bad-row skipping, folding, fsspec URLs."""

from __future__ import annotations

import copy
import pickle
from typing import Any, Callable, Dict, List

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raw_mutations import overstate_row_count

from mtfm_rec.data import reader as rd
from mtfm_rec.data.reader import DataContractError, RawDataset

SCHEMA: Dict[str, Any] = {
    "name": "tiny",
    "time_unit": "s",
    "sequences": [{"name": "orders", "kind": "history", "max_len": 4, "features": {"item": 10}}],
    "scenarios": [
        {
            "name": "hp",
            "user_features": {"city": 4},
            "item_features": {"shop": 5},
            "dense_features": ["price"],
            "tasks": ["click", "order"],
        }
    ],
}


def exposures(**overrides: List[Any]) -> Dict[str, List[Any]]:
    cols: Dict[str, List[Any]] = {
        "user_id": [1, 2, 1],
        "ts": [30, 10, 20],
        "city": [0, 7, None],
        "shop": [-1, 4, 5],
        "price": [1.5, None, 2.0],
        "click": [1, 0, None],
        "order": [1, 0, 0],
    }
    cols.update(overrides)
    return cols


ORDERS = {"user_id": [1, 1], "ts": [5, 6], "item": [3, 12]}


def write(raw_writer: Callable[..., str], root: str, hp: Any = None, **kw: Any) -> str:
    schema = kw.pop("schema", SCHEMA)
    exp = kw.pop("exposures", {"hp": [hp if hp is not None else exposures()]})
    beh = kw.pop("behaviors", {"orders": [ORDERS]})
    return raw_writer(root, schema, exp, beh)


def read_all(ds: RawDataset) -> pa.Table:
    batches = [b for _, b in ds.iter_scenario(ds.schema.scenarios[0])]
    return pa.Table.from_batches(batches)


def assert_contract_error(exc: DataContractError, file_part: str, column: Any, rule: str) -> None:
    msg = str(exc)
    assert file_part in msg, msg
    if column is not None:
        assert f"column {column!r}" in msg, msg
    assert rule in msg, msg
    assert isinstance(exc, ValueError)
    assert str(pickle.loads(pickle.dumps(exc))) == msg  # survives a worker process boundary


def test_normalised_exposures_fold_ids_and_mark_missing(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    ds = RawDataset(write(raw_writer, str(tmp_path / "raw")))
    table = read_all(ds)
    assert table.column_names == rd.exposure_columns(ds.schema.scenarios[0])
    assert table.column("user/city").to_pylist() == [0, 7 % 4, 4]  # null -> missing row (size)
    assert table.column("item/shop").to_pylist() == [(-1) % 5, 4, 0]  # floor modulo
    assert table.column("dense/price").to_pylist() == [1.5, 0.0, 2.0]
    assert table.column("label/click").to_pylist() == [1, 0, -1]  # null label -> missing
    assert table.column("request_id").to_pylist() == [-1, -1, -1]  # optional column absent
    assert table.column("split").to_pylist() == [-1, -1, -1]
    seq = pa.Table.from_batches([b for _, b in ds.iter_sequence(ds.schema.sequences[0])])
    assert seq.column("item").to_pylist() == [3, 2]


def test_optional_request_id_and_split_are_read(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    hp = exposures(request_id=[7, None, 9], split=[0, 2, None])
    table = read_all(RawDataset(write(raw_writer, str(tmp_path / "raw"), hp)))
    assert table.column("request_id").to_pylist() == [7, -1, 9]
    assert table.column("split").to_pylist() == [0, 2, -1]


def test_files_are_read_in_sorted_name_order(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    files = [exposures(user_id=[i, i, i]) for i in range(12)]  # part-0 .. part-11
    ds = RawDataset(write(raw_writer, str(tmp_path / "raw"), exposures={"hp": files}))
    order = [path.rsplit("/", 1)[1] for path, _ in ds.iter_scenario(ds.schema.scenarios[0])]
    assert order == sorted(order) and len(order) == 12


@pytest.mark.parametrize(
    "column, value, rule",
    [
        ("user_id", [1, None, 1], rd.RULE_NULL),
        ("ts", [None, 10, 20], rd.RULE_NULL),
        ("click", [1, 2, 0], rd.RULE_LABEL),
        ("order", [-1, 0, 0], rd.RULE_LABEL),
        ("split", [0, 3, 1], rd.RULE_SPLIT),
    ],
)
def test_bad_rows_raise_naming_file_column_rule(
    raw_writer: Callable[..., str], tmp_path: Any, column: str, value: List[Any], rule: str
) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures(**{column: value}))
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", column, rule)


def test_skip_bad_rows_drops_and_counts_per_file_column_rule(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    bad = exposures(user_id=[None, 2, 1], click=[1, 5, 0])  # row 0 null user, row 1 bad label
    good = exposures()
    root = write(raw_writer, str(tmp_path / "raw"), exposures={"hp": [bad, good]})
    ds = RawDataset(root, skip_bad_rows=True)
    table = read_all(ds)
    assert table.num_rows == 1 + 3
    counts = {(p.rsplit("/", 1)[1], c, r): n for (p, c, r), n in ds.bad_rows.counts.items()}
    assert counts == {
        ("part-0.parquet", "user_id", rd.RULE_NULL): 1,
        ("part-0.parquet", "click", rd.RULE_LABEL): 1,
    }
    assert ds.bad_rows.total == 2
    assert "part-0.parquet: column 'click': label outside {0, 1}: 1" in ds.bad_rows.report()


def test_a_row_bad_twice_is_counted_once(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures(ts=[None, 1, 2], click=[7, 0, 0]))
    ds = RawDataset(root, skip_bad_rows=True)
    assert read_all(ds).num_rows == 2 and ds.bad_rows.total == 1


@pytest.mark.parametrize(
    "hp, column, rule",
    [
        ({k: v for k, v in exposures().items() if k != "shop"}, "shop", rd.RULE_MISSING_COLUMN),
        ({k: v for k, v in exposures().items() if k != "order"}, "order", rd.RULE_MISSING_COLUMN),
        (exposures(user_id=["a", "b", "c"]), "user_id", rd.RULE_NOT_INTEGER),
        (exposures(click=[1.0, 0.0, 1.0]), "click", rd.RULE_NOT_INTEGER),
        (exposures(price=["x", "y", "z"]), "price", rd.RULE_NOT_NUMERIC),
    ],
)
def test_structural_errors_fail_even_when_skipping(
    raw_writer: Callable[..., str], tmp_path: Any, hp: Dict[str, Any], column: str, rule: str
) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), hp)
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root, skip_bad_rows=True))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", column, rule)


def test_missing_sequence_column_is_named(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), behaviors={"orders": [{"user_id": [1], "ts": [1]}]})
    ds = RawDataset(root)
    with pytest.raises(DataContractError) as err:
        list(ds.iter_sequence(ds.schema.sequences[0]))
    assert_contract_error(err.value, "behaviors/orders/part-0.parquet", "item", rd.RULE_MISSING_COLUMN)


def test_undeclared_scenario_folder(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures={"hp": [exposures()], "extra": [exposures()]})
    with pytest.raises(DataContractError) as err:
        RawDataset(root)
    assert_contract_error(err.value, "exposures/extra", None, rd.RULE_UNDECLARED)


def test_undeclared_sequence_folder(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), behaviors={"orders": [ORDERS], "views": [ORDERS]})
    with pytest.raises(DataContractError) as err:
        RawDataset(root)
    assert_contract_error(err.value, "behaviors/views", None, rd.RULE_UNDECLARED)


def test_declared_but_missing_folders(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "a"), behaviors={})
    with pytest.raises(DataContractError) as err:
        RawDataset(root)
    assert_contract_error(err.value, "behaviors/orders", None, rd.RULE_MISSING_FOLDER)
    schema = copy.deepcopy(SCHEMA)
    schema["scenarios"].append(dict(SCHEMA["scenarios"][0], name="food"))
    root = write(raw_writer, str(tmp_path / "b"), schema=schema)
    with pytest.raises(DataContractError) as err:
        RawDataset(root)
    assert_contract_error(err.value, "exposures/food", None, rd.RULE_MISSING_FOLDER)


def test_empty_folder(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), behaviors={"orders": []})
    with pytest.raises(DataContractError) as err:
        RawDataset(root)
    assert_contract_error(err.value, "behaviors/orders", None, rd.RULE_EMPTY_FOLDER)


def test_corrupt_parquet_file(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures={"hp": [exposures(), exposures()]})
    (tmp_path / "raw/exposures/hp/part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    ds = RawDataset(root)
    with pytest.raises(DataContractError) as err:
        read_all(ds)
    assert_contract_error(err.value, "exposures/hp/part-1.parquet", None, rd.RULE_CORRUPT)


def test_a_file_that_reads_fewer_rows_than_its_footer_declares_is_corrupt(
    raw_writer: Callable[..., str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flipped byte in a row-group header can make Arrow read no rows, without an error (the
    fuzz test found one): the rows read are checked against the footer, so none is lost silently."""
    root = write(raw_writer, str(tmp_path / "raw"), exposures={"hp": [exposures(), exposures()]})
    whole = pq.ParquetFile.iter_batches

    def damaged(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        batches = list(whole(self, *args, **kwargs))
        return iter(batches[:-1] if self.metadata.num_rows else batches)  # the last batch lost

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", damaged)
    with pytest.raises(DataContractError, match="read 0 rows of the 3 its footer declares") as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", None, rd.RULE_CORRUPT)


def test_a_footer_that_declares_more_rows_than_the_file_holds_is_corrupt(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures={"hp": [exposures(), exposures()]})
    path = tmp_path / "raw/exposures/hp/part-1.parquet"
    path.write_bytes(overstate_row_count(path.read_bytes()))
    with pytest.raises(DataContractError, match="read 3 rows of the 4 its footer declares") as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-1.parquet", None, rd.RULE_CORRUPT)


def test_memory_url_reads_and_names_files_with_protocol(
    raw_writer: Callable[..., str], memory_root: str
) -> None:
    root = write(raw_writer, memory_root, exposures(click=[1, 0, 9]))
    ds = RawDataset(root, skip_bad_rows=True)
    assert read_all(ds).num_rows == 2
    ((path, _, _),) = ds.bad_rows.counts
    assert path == f"{memory_root}/exposures/hp/part-0.parquet"
    assert fsspec.filesystem("memory").exists(path[len("memory://") :])


def test_all_null_feature_column_folds_to_missing(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    hp = pa.table({k: pa.array(v) for k, v in exposures().items()})
    hp = hp.set_column(hp.schema.get_field_index("city"), "city", pa.nulls(3))
    table = read_all(RawDataset(write(raw_writer, str(tmp_path / "raw"), hp)))
    assert table.column("user/city").to_pylist() == [4, 4, 4]
    np.testing.assert_array_equal(table.column("ts").to_numpy(), [30, 10, 20])  # file order kept


def test_hidden_files_and_folders_are_not_data(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"))
    (tmp_path / "raw/exposures/_temporary").mkdir()
    (tmp_path / "raw/exposures/hp/_SUCCESS").write_text("")
    (tmp_path / "raw/exposures/hp/.part-9.parquet").write_bytes(b"junk")
    ds = RawDataset(root)
    assert [f.rsplit("/", 1)[1] for f in ds.files(rd.EXPOSURES, "hp")] == ["part-0.parquet"]
    assert read_all(ds).num_rows == 3


# ---------------------------------------------------------------- values (issue 9)
_FLOAT64 = pa.float64()  # the default price type, built once (B008)


def _price(values: List[Any], type_: pa.DataType = _FLOAT64) -> Dict[str, Any]:
    return exposures(price=pa.array(values, type_))


@pytest.mark.parametrize(
    "values, type_, row",
    [
        ([1.0, float("nan"), 2.0], pa.float64(), 1),
        ([float("inf"), 1.0, 2.0], pa.float64(), 0),
        ([1.0, 2.0, float("-inf")], pa.float32(), 2),
        ([1.0, 1e39, 2.0], pa.float64(), 1),  # finite in float64, inf once cast to float32
        ([1.0, None, -3.5e38], pa.float64(), 2),
    ],
)
def test_non_finite_dense_value_is_a_named_bad_row(
    raw_writer: Callable[..., str], tmp_path: Any, values: List[Any], type_: pa.DataType, row: int
) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), _price(values, type_))
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", "price", rd.RULE_NOT_FINITE)
    assert f"(row {row}; 1 such row(s)" in str(err.value)
    ds = RawDataset(root, skip_bad_rows=True)
    table = read_all(ds)
    assert table.num_rows == 2 and np.isfinite(table.column("dense/price").to_numpy()).all()
    ((key, n),) = ds.bad_rows.counts.items()
    assert key[1:] == ("price", rd.RULE_NOT_FINITE) and n == 1


def test_dense_values_at_the_float32_limit_and_large_integers_are_read(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    top = float(np.finfo(np.float32).max)
    table = read_all(RawDataset(write(raw_writer, str(tmp_path / "a"), _price([top, -top, 0.5]))))
    assert table.column("dense/price").to_pylist() == [top, -top, 0.5]
    # an integer dense column beyond 2**24 is rounded to float32 (pyarrow's cast used to raise)
    table = read_all(
        RawDataset(write(raw_writer, str(tmp_path / "b"), _price([2**24 + 1, 3, None], pa.int64())))
    )
    assert table.column("dense/price").to_pylist() == [2.0**24, 3.0, 0.0]


@pytest.mark.parametrize(
    "ts, row", [([30, 2**62, 20], 1), ([-(2**62) - 1, 10, 20], 0), ([30, 10, 2**63 - 1], 2)]
)
def test_ts_outside_the_safe_range_is_a_named_bad_row(
    raw_writer: Callable[..., str], tmp_path: Any, ts: List[int], row: int
) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures(ts=ts))
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", "ts", rd.RULE_TS_RANGE)
    assert f"(row {row};" in str(err.value)
    ds = RawDataset(root, skip_bad_rows=True)
    assert read_all(ds).num_rows == 2 and ds.bad_rows.total == 1


def test_behaviour_ts_outside_the_safe_range_is_refused(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    # a far-past action whose window arithmetic would wrap: it could land in any window's history
    root = write(raw_writer, str(tmp_path / "raw"), behaviors={"orders": [dict(ORDERS, ts=[5, -(2**63)])]})
    ds = RawDataset(root)
    with pytest.raises(DataContractError) as err:
        list(ds.iter_sequence(ds.schema.sequences[0]))
    assert_contract_error(err.value, "behaviors/orders/part-0.parquet", "ts", rd.RULE_TS_RANGE)


def test_ts_at_the_ends_of_the_safe_range_is_kept(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures(ts=[rd.TS_MIN, rd.TS_MAX - 1, 0]))
    assert read_all(RawDataset(root)).column("ts").to_pylist() == [rd.TS_MIN, rd.TS_MAX - 1, 0]


@pytest.mark.parametrize("column", ["user_id", "shop", "request_id", "click"])
def test_uint64_values_that_would_wrap_are_a_named_bad_row(
    raw_writer: Callable[..., str], tmp_path: Any, column: str
) -> None:
    good = {"user_id": [1, 2, 1], "shop": [0, 4, 5], "request_id": [1, 2, 3], "click": [1, 0, 0]}[column]
    values = pa.array(good[:2] + [2**64 - 1], pa.uint64())
    root = write(raw_writer, str(tmp_path / "raw"), exposures(**{column: values}))
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", column, rd.RULE_INT64)
    assert "(row 2;" in str(err.value)


def test_uint64_values_that_fit_are_read_as_int64(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    hp = exposures(
        user_id=pa.array([2**63 - 1, 2, 1], pa.uint64()), shop=pa.array([0, 4, 2**63 - 1], pa.uint64())
    )
    beh = {"orders": [dict(ORDERS, item=pa.array([3, 2**63 - 1], pa.uint64()))]}
    ds = RawDataset(write(raw_writer, str(tmp_path / "raw"), hp, behaviors=beh))
    table = read_all(ds)
    assert table.column("user_id").to_pylist() == [2**63 - 1, 2, 1]
    assert table.column("item/shop").to_pylist() == [0, 4, (2**63 - 1) % 5]
    seq = pa.Table.from_batches([b for _, b in ds.iter_sequence(ds.schema.sequences[0])])
    assert seq.column("item").to_pylist() == [3, (2**63 - 1) % 10]


def test_uint64_behaviour_feature_that_would_wrap_is_refused(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    beh = {"orders": [dict(ORDERS, item=pa.array([3, 2**63], pa.uint64()))]}
    ds = RawDataset(write(raw_writer, str(tmp_path / "raw"), behaviors=beh))
    with pytest.raises(DataContractError) as err:
        list(ds.iter_sequence(ds.schema.sequences[0]))
    assert_contract_error(err.value, "behaviors/orders/part-0.parquet", "item", rd.RULE_INT64)


def test_funnel_violation_is_a_named_bad_row(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    root = write(raw_writer, str(tmp_path / "raw"), exposures(click=[1, 0, None], order=[1, 1, 1]))
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", "order", rd.RULE_FUNNEL)
    assert "(row 1; 1 such row(s) in this batch; funnel order ['click', 'order'])" in str(err.value)
    ds = RawDataset(root, skip_bad_rows=True)
    table = read_all(ds)  # row 2 (click unknown, order 1) is no contradiction: kept
    assert table.column("label/click").to_pylist() == [1, -1]
    assert table.column("label/order").to_pylist() == [1, 1]
    assert {k[1:]: n for k, n in ds.bad_rows.counts.items()} == {("order", rd.RULE_FUNNEL): 1}


def test_funnel_is_checked_across_an_unknown_middle_task(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    schema = copy.deepcopy(SCHEMA)
    schema["scenarios"][0]["tasks"] = ["click", "order", "pay"]
    hp = exposures(click=[0, 1, 1], order=[None, None, 0], pay=[1, 1, 0])
    root = write(raw_writer, str(tmp_path / "raw"), hp, schema=schema)
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", "pay", rd.RULE_FUNNEL)
    assert "(row 0;" in str(err.value)


def test_a_row_with_a_nan_and_a_broken_funnel_counts_once(
    raw_writer: Callable[..., str], tmp_path: Any
) -> None:
    hp = exposures(price=[float("nan"), 1.0, 2.0], click=[0, 0, 1], order=[1, 0, 1])
    ds = RawDataset(write(raw_writer, str(tmp_path / "raw"), hp), skip_bad_rows=True)
    assert read_all(ds).num_rows == 2
    assert {k[1:]: n for k, n in ds.bad_rows.counts.items()} == {("price", rd.RULE_NOT_FINITE): 1}


@pytest.mark.parametrize("column", ["user_id", "shop", "price", "click"])
def test_a_column_written_twice_is_a_named_structural_error(
    raw_writer: Callable[..., str], tmp_path: Any, column: str
) -> None:
    # Arrow tables (and Parquet files) may hold two columns of one name; which one is data?
    table = pa.table({k: pa.array(v) for k, v in exposures().items()})
    table = table.append_column(column, table.column(column))
    root = write(raw_writer, str(tmp_path / "raw"), table)
    with pytest.raises(DataContractError) as err:
        read_all(RawDataset(root, skip_bad_rows=True))
    assert_contract_error(err.value, "exposures/hp/part-0.parquet", column, rd.RULE_DUPLICATE_COLUMN)
    assert "2 columns of this name" in str(err.value)


def test_a_duplicated_unused_column_is_ignored(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    table = pa.table({k: pa.array(v) for k, v in exposures(note=["a", "b", "c"]).items()})
    root = write(raw_writer, str(tmp_path / "raw"), table.append_column("note", table.column("note")))
    assert read_all(RawDataset(root)).num_rows == 3


def test_symlinked_files_and_folders_are_read(raw_writer: Callable[..., str], tmp_path: Any) -> None:
    # fsspec lists a symlink as type "other": such a Parquet file used to be skipped silently
    root = write(raw_writer, str(tmp_path / "raw"), exposures={"hp": [exposures(), exposures()]})
    hp = tmp_path / "raw/exposures/hp"
    (tmp_path / "kept").mkdir()
    (hp / "part-1.parquet").rename(tmp_path / "kept/elsewhere.parquet")
    (hp / "part-1.parquet").symlink_to(tmp_path / "kept/elsewhere.parquet")
    orders = tmp_path / "raw/behaviors/orders"
    orders.rename(tmp_path / "kept/orders")
    orders.symlink_to(tmp_path / "kept/orders", target_is_directory=True)
    ds = RawDataset(root)
    assert [f.rsplit("/", 1)[1] for f in ds.files(rd.EXPOSURES, "hp")] == ["part-0.parquet", "part-1.parquet"]
    assert read_all(ds).num_rows == 6
    assert sum(b.num_rows for _, b in ds.iter_sequence(ds.schema.sequences[0])) == 2
    assert len(ds.fingerprint_entries()) == 4


@pytest.mark.parametrize("entry", ["dangling link", "folder", "device"])
def test_a_parquet_name_that_is_not_a_regular_file_is_refused(
    raw_writer: Callable[..., str], tmp_path: Any, entry: str
) -> None:
    root = write(raw_writer, str(tmp_path / "raw"))
    path = tmp_path / "raw/exposures/hp/part-1.parquet"
    if entry == "dangling link":
        path.symlink_to(tmp_path / "gone.parquet")
    elif entry == "folder":  # e.g. a Spark dataset folder: its files would go unread
        (path / "part-0.parquet").parent.mkdir()
        (path / "part-0.parquet").write_bytes(b"")
    else:
        path.symlink_to("/dev/null")
    with pytest.raises(DataContractError) as err:
        RawDataset(root)
    assert_contract_error(err.value, "exposures/hp/part-1.parquet", None, rd.RULE_NOT_A_FILE)
