"""The two recipes that turn MovieLens-1M into raw-contract tables: ``ml1m_swr``, ``ml1m_genre``.

Each recipe takes the :class:`mtfm_rec.data.public.movielens.MovieLens` arrays and returns
``(schema, exposures, behaviours)``: the :class:`DatasetSchema` and the exposure and behaviour
tables by name, which :func:`mtfm_rec.data.public.movielens.build` writes (docs/DATASETS.md
describes both recipes). Fetching, reading and writing are in :mod:`mtfm_rec.data.public.movielens`;
like it, this module imports numpy, pyarrow and torch where used, so that the CLI's up-to-date
check stays fast.

It stays one module, under 500 lines: the two recipes share the encodings and the table
builders at its top, which a module per recipe would have to move into a third.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence, Tuple

if TYPE_CHECKING:
    import numpy as np

    from mtfm_rec.data.public.movielens import MovieLens
    from mtfm_rec.data.schema import MultiHotFeature, ScenarioSpec, SequenceSpec

# Bump a recipe's version whenever its output changes, so old builds are rebuilt.
# (ml1m_swr 4, ml1m_genre 3: the multi-hot item feature ``genres``.)
RECIPES: Dict[str, int] = {"ml1m_swr": 4, "ml1m_genre": 3}
# Both recipes: the movie's full genre list, a multi-hot item feature of every scenario (global
# genre ids, in the file's order), beside the single first-genre feature the benchmark has.
GENRES_FEATURE = "genres"
GENRES_POOLING = "mean"

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
    genre_lists: Any  # pa.ListArray: per movie, the ids in ``genres`` of all its genres
    zip_id: np.ndarray
    num_zips: int
    age_bucket: np.ndarray
    ages: List[int]


def _encode(ml: MovieLens) -> _Encoded:
    import numpy as np
    import pyarrow as pa

    genres = _vocab([g for gs in ml.movie_genres for g in gs])
    ages = sorted(set(ml.user_age.tolist()))
    zips = _vocab(ml.user_zip)
    return _Encoded(
        genres=genres,
        first_genre=np.array([genres[gs[0]] for gs in ml.movie_genres], np.int64),
        genre_lists=pa.array([[genres[g] for g in gs] for gs in ml.movie_genres], pa.list_(pa.int64())),
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
    cols: Dict[str, Any],
    dense: Sequence[str],
    tasks: Sequence[str],
):
    """An exposure table over the ratings ``rows`` in their given order (``cols``: numpy arrays
    per rating, or an Arrow list array per rating for a multi-hot feature)."""
    import pyarrow as pa

    out = {
        "user_id": pa.array(ml.user_key[ml.rating_user[rows]], pa.int64()),
        "ts": pa.array(ml.rating_ts[rows], pa.int64()),
    }
    for name, values in cols.items():
        if isinstance(values, pa.Array):
            out[name] = values.take(pa.array(rows))
            continue
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


def _genres_per_rating(ml: MovieLens, enc: _Encoded):
    """Per rating, its movie's genre ids: the ``list<int64>`` column of ``genres``."""
    import pyarrow as pa

    return enc.genre_lists.take(pa.array(ml.rating_movie))


def _genres_spec(enc: _Encoded) -> MultiHotFeature:
    """The multi-hot item feature ``genres``: every genre id, mean-pooled."""
    from mtfm_rec.data.schema import MultiHotFeature

    return MultiHotFeature("item", len(enc.genres), GENRES_POOLING)


def _swr_columns(ml: MovieLens, enc: _Encoded) -> Tuple[Dict[str, Any], Dict[str, int]]:
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
        GENRES_FEATURE: _genres_per_rating(ml, enc),
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

    enc = _encode(ml)
    cols, sizes = _swr_columns(ml, enc)
    genres = {GENRES_FEATURE: _genres_spec(enc)}
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
                multi_hot_features=dict(genres),
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


def _genre_columns(ml: MovieLens, enc: _Encoded) -> Tuple[Dict[str, Any], Dict[str, int]]:
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
        GENRES_FEATURE: _genres_per_rating(ml, enc),
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
    ml: MovieLens,
    name: str,
    rows: np.ndarray,
    cols: Dict[str, Any],
    sizes: Dict[str, int],
    genres: MultiHotFeature,
) -> Tuple[ScenarioSpec, Any]:
    """Scenario ``name``'s spec and exposure table over ``rows``: the features its
    :data:`GENRE_LAYOUT` entry names, the multi-hot ``genres`` (every scenario), the click and
    like tasks."""
    from mtfm_rec.data.schema import ScenarioSpec

    user_f, item_f, cross_f, dense_f = GENRE_LAYOUT[name]
    spec = ScenarioSpec(
        name=name,
        user_features={k: sizes[k] for k in user_f},
        item_features={k: sizes[k] for k in item_f},
        cross_features={k: sizes[k] for k in cross_f},
        dense_features=list(dense_f),
        tasks=["click", "like"],
        multi_hot_features={GENRES_FEATURE: genres},
    )
    keep = {k: cols[k] for k in user_f + item_f + (GENRES_FEATURE,) + cross_f + dense_f + ("click", "like")}
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
    genres_spec = _genres_spec(enc)
    scenarios, exposures = [], {}
    for gi, (name, genres) in enumerate(GENRE_GROUPS.items()):
        rows = np.flatnonzero(group == gi)
        local, num_movies = _group_columns(ml, enc, movie_group, gi, rows)
        size = dict(sizes, movie_id=num_movies, genre=len(genres))
        spec, exposures[name] = _genre_scenario(ml, name, rows, {**common, **local}, size, genres_spec)
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
