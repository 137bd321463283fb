"""Writing tables in the raw contract layout (dataset.yaml + exposures/ + behaviors/).

Used by the synthetic generator, the public-dataset recipes and tests; the inverse of
``mtfm_rec.data.reader``.
"""

from __future__ import annotations

from typing import Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mtfm_rec.data.schema import DatasetSchema


def write_raw_dataset(
    out: str,
    schema: DatasetSchema,
    exposures: Mapping[str, pa.Table],
    behaviors: Mapping[str, pa.Table],
    files_per_folder: int = 1,
) -> None:
    """Writes tables in the raw contract layout under ``out`` (local path or fsspec URL).

    Existing ``exposures/`` and ``behaviors/`` folders under ``out`` are replaced (stale part files
    would otherwise join the dataset); ``dataset.yaml`` is written last, so a reader never sees a
    schema without its data. Each folder is cut into ``files_per_folder`` files by user id, so a
    user's rows may be in any file, as the contract allows.
    """
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    for kind in ("exposures", "behaviors"):
        if fs.exists(f"{root}/{kind}"):
            fs.rm(f"{root}/{kind}", recursive=True)
    for kind, tables in (("exposures", exposures), ("behaviors", behaviors)):
        for name, table in tables.items():
            write_by_user(fs, f"{root}/{kind}/{name}", table, files_per_folder)
    with fs.open(f"{root}/dataset.yaml", "w") as fh:
        fh.write(schema.to_yaml())


def write_by_user(fs: fsspec.AbstractFileSystem, folder: str, table: pa.Table, files: int) -> None:
    """``table`` cut into ``folder/part-NNNNN.parquet`` by ``user_id mod files``, row order kept."""
    fs.makedirs(folder, exist_ok=True)
    part = table["user_id"].to_numpy() % files
    for i in range(files):
        with fs.open(f"{folder}/part-{i:05d}.parquet", "wb") as fh:
            pq.write_table(table.filter(pa.array(part == i)), fh)
