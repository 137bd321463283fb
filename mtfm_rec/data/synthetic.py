"""A synthetic multi-scenario dataset with planted structure, written in the raw contract.

    python -m mtfm_rec.data.synthetic --out data/synthetic --users 2000 --days 7

The generator plants exactly the signals MTFM is built to use (paper 3.1, 3.2.1), so that a model
that reads the behaviour sequences clearly beats one that reads only the exposure features:

* **Long-term taste** (``taste``): every user has a latent vector shared by all scenarios; every
  item a vector near its category's vector. Click/order logits grow with ``taste . item``. Taste is
  visible ONLY through the behaviour sequences (orders and clicks are drawn from it); user features
  are weak demographics that shift taste by a small amount, and there is no user-id feature.
* **Short-term intent** (``intent``): some sessions start with a burst of real-time actions on one
  category; exposures of that category whose ``ts`` is strictly after the burst's first action get
  a click boost. Exposures of that category *before* the burst get none, so only real-time actions
  with an earlier ``ts`` help: a model that peeks at later actions learns a wrong rule.
* **Leak trap**: every click is echoed into the real-time sequence 1-20 s after its exposure, and
  every order into the order history 1-10 min after it. A model that sees actions with a ts not
  strictly below its exposure's reads its own label.
* **Scenario-specific schemas and effects**: ``feed`` (large; click + order; position, price),
  ``search`` (intent-driven; distance, rating, brand with a few nulls; its category ids are a
  permutation of the global ones), ``coupon`` (sparse: few exposures; click + order; discount).

Times are seconds from ``start_ts`` (midnight UTC), exposures on ``num_days`` days, orders also
on ``history_days`` days before. ``dataset.yaml`` carries ``recommended_valid_after`` (start of the
second-to-last day) and ``recommended_eval_after`` (start of the last day) as extra keys.
Everything is drawn from one ``numpy`` generator seeded by ``seed``: same arguments, same bytes.

It stays one module (about 800 lines): the config, the schema, the draws and the writers are one
generative process. The draws run in one fixed order from that one generator (the order is the
data), and the sizes the schema declares (catalogue shares, slates, vocabularies) are the ones
the draws use, so a split would put the schema and the draws it describes, or consecutive draws,
in different files.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import fsspec
import numpy as np
import pyarrow as pa

from mtfm_rec.data.reader import read_parquet_folder
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec, SequenceSpec
from mtfm_rec.data.writer import write_by_user, write_raw_dataset

DAY = 86400
LATENT_DIM = 8
NUM_AGE_BUCKETS, NUM_GENDERS, NUM_CITIES, NUM_VIP_LEVELS = 7, 3, 32, 5
NUM_BRANDS = 50
FEED_SLATE, SEARCH_SLATE = 4, 3  # exposures per request: position is the index in the slate
# Share of each scenario's item catalogue (global item ids are split into three ranges).
CATALOGUE_SHARE = {"feed": 0.5, "search": 0.35, "coupon": 0.15}
GENERATOR_MODULE = "mtfm_rec.data.synthetic"  # dataset.yaml's generator record (also under -m)
# Weight of taste . item in each order logit (the click logits' weights are the config's
# taste_weight); one home for the generator and the plug-in reference that replays it.
ORDER_TASTE_WEIGHT = {"feed": 0.8, "coupon": 1.0}
# Each scenario's item id column: the item's index in the scenario's catalogue range.
ITEM_ID_COLUMN = {"feed": "item_id", "search": "poi_id", "coupon": "coupon_id"}
# A burst's actions fall in its session's first BURST_SECONDS; a request falls in
# [-600, 1800) s around its session's start (the intent posterior reference reads both).
BURST_SECONDS = 240
REQUEST_OFFSET_SECONDS = (-600, 1800)


@dataclass
class SyntheticConfig:
    """Sizes and planted-effect strengths of the generator (defaults: ~2 s, ~170k exposures)."""

    num_users: int = 2000
    num_days: int = 7  # days with exposures (>= 3); the last two are the recommended valid/test days
    exposures_per_user_day: float = 12.0  # mean over all scenarios; feed ~60 %, search ~35 %
    coupon_share: float = 0.02  # the sparse scenario's share of exposures
    history_days: int = 14  # days of order history before the first exposure day
    num_items: int = 3000
    num_categories: int = 16
    orders_per_day: float = 3.0  # background orders drawn from taste
    browses_per_day: float = 2.0  # background real-time clicks drawn from taste
    sessions_per_day: float = 1.6  # mean; >= 1 per user-day
    intent_prob: float = 0.6  # share of sessions that start with an intent burst
    intent_show_prob: float = 0.4  # share of an intent session's exposures in the intent category
    taste_temperature: float = 1.5  # how peaked behaviours are on the user's favourite categories
    demographic_weight: float = 0.3  # how much age bucket shifts taste (weak on purpose)
    start_ts: int = 1704067200  # 2024-01-01 00:00:00 UTC
    files_per_folder: int = 2
    seed: int = 0
    # Declare dataset.yaml's shared_embeddings (sequence and exposure ids in one table). False is
    # the alignment-free case of the paper: the model must learn that feed's `category` and the
    # history's `category` mean the same (the quality benchmark's default).
    shared_embeddings: bool = True
    # Per-scenario logit weights of taste . item and of an intent hit.
    taste_weight: Dict[str, float] = field(
        default_factory=lambda: {"feed": 1.2, "search": 0.7, "coupon": 1.5}
    )
    intent_weight: Dict[str, float] = field(
        default_factory=lambda: {"feed": 1.5, "search": 2.0, "coupon": 0.6}
    )

    def validate(self) -> None:
        if self.num_users < 1 or self.num_days < 3:
            raise ValueError("need num_users >= 1 and num_days >= 3 (train, valid and test days)")
        smallest = int(self.num_items * min(CATALOGUE_SHARE.values()))
        if smallest < self.num_categories:
            raise ValueError(
                f"num_items={self.num_items} too small: every scenario's catalogue needs each of "
                f"the {self.num_categories} categories (need num_items >= "
                f"{int(np.ceil(self.num_categories / min(CATALOGUE_SHARE.values())))})"
            )
        if self.files_per_folder < 1:
            raise ValueError("files_per_folder must be >= 1")


def build_schema(cfg: SyntheticConfig) -> DatasetSchema:
    """The ``dataset.yaml`` of a generated dataset (sizes follow ``cfg``)."""
    n_items, n_cat = cfg.num_items, cfg.num_categories
    catalogue = _catalogue_ranges(n_items)
    size = {s: hi - lo for s, (lo, hi) in catalogue.items()}
    start = cfg.start_ts
    return DatasetSchema(
        name="synthetic",
        time_unit="s",
        sequences=[
            SequenceSpec("orders", "history", 64, {"item_id": n_items, "category": n_cat}),
            SequenceSpec("clicks_rt", "realtime", 64, {"item_id": n_items, "category": n_cat}),
        ],
        scenarios=[
            ScenarioSpec(
                name="feed",
                user_features={"age_bucket": NUM_AGE_BUCKETS, "gender": NUM_GENDERS},
                item_features={"item_id": size["feed"], "category": n_cat},
                cross_features={"position": FEED_SLATE},
                dense_features=["price"],
                tasks=["click", "order"],
            ),
            ScenarioSpec(
                name="search",
                user_features={"city": NUM_CITIES},
                item_features={"poi_id": size["search"], "poi_cat": n_cat, "brand": NUM_BRANDS},
                cross_features={"distance_bucket": 8, "hour": 24},
                dense_features=["distance_km", "rating"],
                tasks=["click"],
            ),
            ScenarioSpec(
                name="coupon",
                user_features={"vip_level": NUM_VIP_LEVELS, "age_bucket": NUM_AGE_BUCKETS},
                item_features={"coupon_id": size["coupon"], "category": n_cat},
                cross_features={},
                dense_features=["discount"],
                tasks=["click", "order"],
            ),
        ],
        # Global item and category ids are one id space in both sequences and in feed/coupon
        # items; search's poi_cat is a permutation on purpose, and scenario item ids are local.
        shared_embeddings=_SHARED_EMBEDDINGS if cfg.shared_embeddings else {},
        extra={
            "recommended_valid_after": start + (cfg.num_days - 2) * DAY,
            "recommended_eval_after": start + (cfg.num_days - 1) * DAY,
            # R = the window's own real-time actions: the planted intent lives in the session;
            # yesterday's clicks only dilute the pointwise attention (docs/TRAINING.md, "Model
            # quality": +1.3 / +1.4 AUC points on feed / search against a one-day lookback).
            "recommended_realtime_lookback_seconds": 0,
            "generator": {
                "module": GENERATOR_MODULE,
                **asdict(cfg),
            },
        },
    )


_SHARED_EMBEDDINGS = {
    "item_id": ["seq/orders/item_id", "seq/clicks_rt/item_id"],
    "category": [
        "seq/orders/category",
        "seq/clicks_rt/category",
        "exp/feed/item/category",
        "exp/coupon/item/category",
    ],
}


def _catalogue_ranges(num_items: int) -> Dict[str, tuple]:
    """Global item id range [lo, hi) of each scenario's catalogue."""
    out, lo = {}, 0
    names = list(CATALOGUE_SHARE)
    for i, name in enumerate(names):
        hi = num_items if i == len(names) - 1 else lo + int(round(num_items * CATALOGUE_SHARE[name]))
        out[name] = (lo, hi)
        lo = hi
    return out


@dataclass
class SyntheticData:
    """Generated tables plus the planted ground truth (never written to disk).

    ``truth[scenario]`` holds per-exposure arrays in row order: ``affinity`` (taste . item),
    ``intent_hit`` (an intent action on the item's category strictly before the exposure),
    ``click_logit``, ``category`` (the item's global category; search's ``poi_cat`` is a
    permutation of it), ``p_click`` and, where the scenario has an order task, ``p_order``
    (the unconditional true probabilities the labels were drawn from). :func:`write_truth` writes
    them beside the data.
    """

    schema: DatasetSchema
    exposures: Dict[str, pa.Table]
    behaviors: Dict[str, pa.Table]
    truth: Dict[str, Dict[str, np.ndarray]]


_Actions = Tuple[np.ndarray, np.ndarray, np.ndarray]  # (users, ts, items) of behaviour actions


class _World:
    """Users, items and the samplers that draw behaviour from taste."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        self.cfg, self.rng = cfg, rng
        k, n_cat, n_users = LATENT_DIM, cfg.num_categories, cfg.num_users
        self.cat_vec = rng.normal(0.0, 1.0 / np.sqrt(k), (n_cat, k))
        # Users: weak demographics; taste = small age-bucket shift + individual part.
        self.age_bucket = rng.integers(0, NUM_AGE_BUCKETS, n_users)
        self.gender = rng.integers(0, NUM_GENDERS, n_users)
        self.city = rng.integers(0, NUM_CITIES, n_users)
        self.vip = np.minimum(rng.geometric(0.5, n_users) - 1, NUM_VIP_LEVELS - 1)
        w = cfg.demographic_weight
        age_dir = rng.normal(0.0, 1.0, (NUM_AGE_BUCKETS, k))
        self.taste = (w * age_dir[self.age_bucket] + rng.normal(0.0, 1.0, (n_users, k))) / np.sqrt(
            1.0 + w * w
        )
        # The prior of a user's taste given what a model sees of it (the age bucket): Gaussian,
        # mean w * age_dir / sqrt(1 + w^2), precision 1 + w^2 in every direction.
        self.taste_prior_mean = w * age_dir[self.age_bucket] / np.sqrt(1.0 + w * w)
        self.taste_prior_precision = 1.0 + w * w
        # Items: each catalogue covers every category (balanced, shuffled).
        self.ranges = _catalogue_ranges(cfg.num_items)
        self.item_cat = np.empty(cfg.num_items, np.int64)
        for lo, hi in self.ranges.values():
            self.item_cat[lo:hi] = rng.permutation(np.arange(hi - lo) % n_cat)
        noise = rng.normal(0.0, 0.3 / np.sqrt(k), (cfg.num_items, k))
        self.item_vec = self.cat_vec[self.item_cat] + noise
        self.item_bias = rng.normal(0.0, 0.5, cfg.num_items)
        # Per-category item lists, globally and per catalogue, for O(1) sampling.
        self._by_cat = {name: self._index(lo, hi) for name, (lo, hi) in self.ranges.items()}
        self._by_cat["all"] = self._index(0, cfg.num_items)

    def _index(self, lo: int, hi: int) -> tuple:
        order = lo + np.argsort(self.item_cat[lo:hi], kind="stable")
        counts = np.bincount(self.item_cat[lo:hi], minlength=self.cfg.num_categories)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return order, starts, counts

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.einsum("nk,nk->n", self.taste[users], self.item_vec[items])

    def item_in_category(self, cats: np.ndarray, catalogue: str) -> np.ndarray:
        order, starts, counts = self._by_cat[catalogue]
        pick = np.floor(self.rng.random(len(cats)) * counts[cats]).astype(np.int64)
        return order[starts[cats] + pick]

    def taste_categories(self, users: np.ndarray) -> np.ndarray:
        """One category per user in ``users``, drawn from softmax(temperature * taste . category)."""
        cdf = np.cumsum(self._taste_softmax(self.taste[users]), axis=1)
        u = self.rng.random((len(users), 1))
        return np.minimum((cdf < u).sum(axis=1), self.cfg.num_categories - 1)

    def map_taste(self, counts: np.ndarray, users: np.ndarray, max_iters: int = 100) -> np.ndarray:
        """The posterior mode of each user's taste given ``counts`` [n, num_categories] of actions
        drawn by :meth:`taste_categories` (and the user's prior): ``[n, LATENT_DIM]``.

        Newton's method on the log posterior (concave), each row's step halved until the posterior
        does not fall: the plain step overshoots on the peaked counts of users with one dominant
        category, and gradient ascent needed thousands of steps. A row stops once its step is
        below 1e-9.
        """
        taste = self.taste_prior_mean[users].copy()
        active = np.flatnonzero(counts.sum(axis=1) > 0)  # no actions: the prior mean is the mode
        for _ in range(max_iters):
            if not len(active):
                break
            step = self._newton_step(taste[active], counts[active], users[active])
            taste[active] += step
            active = active[np.abs(step).max(axis=1) >= 1e-9]
        return taste

    def _newton_step(self, taste: np.ndarray, counts: np.ndarray, users: np.ndarray) -> np.ndarray:
        """One damped Newton step of :meth:`map_taste` per row."""
        mu, temp = self.taste_prior_mean[users], self.cfg.taste_temperature
        precision = self.taste_prior_precision
        total = counts.sum(axis=1)
        p = self._taste_softmax(taste)
        grad = temp * (counts - total[:, None] * p) @ self.cat_vec - precision * (taste - mu)
        mean = p @ self.cat_vec  # the covariance of the category vectors under p, per row
        cov = np.einsum("nc,cd,ce->nde", p, self.cat_vec, self.cat_vec) - mean[:, :, None] * mean[:, None, :]
        hessian = temp * temp * total[:, None, None] * cov + precision * np.eye(taste.shape[1])
        step = np.linalg.solve(hessian, grad[:, :, None])[:, :, 0]
        before = self._log_posterior(taste, counts, total, mu)
        for _ in range(40):
            worse = self._log_posterior(taste + step, counts, total, mu) < before
            if not worse.any():
                break
            step[worse] *= 0.5
        return step

    def _taste_softmax(self, taste: np.ndarray) -> np.ndarray:
        logits = self.cfg.taste_temperature * (taste @ self.cat_vec.T)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    def _log_posterior(
        self, taste: np.ndarray, counts: np.ndarray, total: np.ndarray, mu: np.ndarray
    ) -> np.ndarray:
        """Per row, up to a constant: the multinomial log likelihood of ``counts`` + the prior's."""
        logits = self.cfg.taste_temperature * (taste @ self.cat_vec.T)
        top = logits.max(axis=1)
        log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        prior = 0.5 * self.taste_prior_precision * ((taste - mu) ** 2).sum(axis=1)
        return (counts * logits).sum(axis=1) - total * log_norm - prior

    def background(self, rate_per_day: float, first_day: int, last_day: int) -> _Actions:
        """Taste-driven actions at uniform times over [first_day, last_day) (days from start)."""
        n = self.rng.poisson(rate_per_day * (last_day - first_day), self.cfg.num_users)
        users = np.repeat(np.arange(self.cfg.num_users), n)
        ts = self.cfg.start_ts + self.rng.integers(first_day * DAY, last_day * DAY, len(users))
        items = self.item_in_category(self.taste_categories(users), "all")
        return users, ts, items


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# Requests draw one slate of exposures each: position is the index in the slate.
_SLATES = {"feed": FEED_SLATE, "search": SEARCH_SLATE, "coupon": 1}
_Features = Tuple[np.ndarray, Optional[np.ndarray], Dict[str, object]]


@dataclass
class _Sessions:
    """The sessions of every user-day and their intent bursts, shared by all scenarios.

    Attributes:
        per_day: [users, days] sessions of each user-day (>= 1).
        user, day_start, ts: [S] per session, user-day-major.
        first: [users * days] index of each user-day's first session.
        intent: [S] the intent category of each session, -1 for none.
        burst_session, burst_ts, burst_items: [bursts] the real-time actions of the bursts.
        burst_first: [S] ts of the session's first burst action (int64 max without a burst).
    """

    per_day: np.ndarray
    user: np.ndarray
    day_start: np.ndarray
    ts: np.ndarray
    first: np.ndarray
    intent: np.ndarray
    burst_session: np.ndarray
    burst_ts: np.ndarray
    burst_first: np.ndarray
    burst_items: np.ndarray


@dataclass
class _Sim:
    """What every scenario's draw reads: the config, the one generator, the world, the sessions."""

    cfg: SyntheticConfig
    rng: np.random.Generator
    world: _World
    sessions: _Sessions
    search_cat_perm: np.ndarray  # search's poi_cat = this permutation of the global category
    schema: DatasetSchema


@dataclass
class _Rows:
    """One scenario's exposure rows as drawn: request-major, slate positions in order."""

    request: np.ndarray  # the row's request, numbered within the scenario
    request_id: np.ndarray  # the row's dataset-wide request id
    position: np.ndarray
    user: np.ndarray
    ts: np.ndarray
    item: np.ndarray  # global item id
    local_item: np.ndarray  # item id within the scenario's catalogue
    category: np.ndarray
    affinity: np.ndarray
    intent_hit: np.ndarray
    base_logit: np.ndarray  # item bias + the scenario's taste and intent effects
    num_requests: int

    def __len__(self) -> int:
        return len(self.request)


@dataclass
class _Echoes:
    """(users, ts, items) of the labels echoed into the behaviour sequences (the leak trap)."""

    clicks: List[_Actions] = field(default_factory=list)
    orders: List[_Actions] = field(default_factory=list)


def _draw_sessions(cfg: SyntheticConfig, rng: np.random.Generator, world: _World) -> _Sessions:
    """Draws >= 1 session per user-day at a uniform time leaving an hour before midnight, and
    the intent bursts: 2+ real-time actions on one uniform category within 4 minutes."""
    n_users, n_days = cfg.num_users, cfg.num_days
    per_day = 1 + rng.poisson(max(cfg.sessions_per_day - 1.0, 0.0), (n_users, n_days))
    sess_user = np.repeat(np.repeat(np.arange(n_users), n_days), per_day.ravel())
    sess_day = np.repeat(np.tile(np.arange(n_days), n_users), per_day.ravel())
    day_start = cfg.start_ts + sess_day * DAY
    sess_ts = day_start + rng.integers(0, DAY - 3600, len(sess_user))
    first_sess = np.concatenate([[0], np.cumsum(per_day.ravel())[:-1]])  # per user-day
    has_intent = rng.random(len(sess_user)) < cfg.intent_prob
    sess_intent = np.where(has_intent, rng.integers(0, cfg.num_categories, len(sess_user)), -1)
    burst_n = np.where(has_intent, 2 + rng.poisson(1.5, len(sess_user)), 0)
    burst_sess = np.repeat(np.arange(len(sess_user)), burst_n)
    burst_ts = sess_ts[burst_sess] + rng.integers(0, BURST_SECONDS, len(burst_sess))
    burst_first = np.full(len(sess_user), np.iinfo(np.int64).max)
    np.minimum.at(burst_first, burst_sess, burst_ts)
    return _Sessions(
        per_day=per_day,
        user=sess_user,
        day_start=day_start,
        ts=sess_ts,
        first=first_sess,
        intent=sess_intent,
        burst_session=burst_sess,
        burst_ts=burst_ts,
        burst_first=burst_first,
        burst_items=world.item_in_category(sess_intent[burst_sess], "all"),
    )


def _draw_requests(sim: _Sim, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """(session, ts) of each request of scenario ``name``: Poisson per user-day, in one of the
    user-day's sessions, from 10 min before to 30 min after it starts (clipped to its day)."""
    cfg, rng, sessions = sim.cfg, sim.rng, sim.sessions
    share = {
        "feed": 0.6 * (1 - cfg.coupon_share),
        "search": 0.4 * (1 - cfg.coupon_share),
        "coupon": cfg.coupon_share,
    }
    user_days = cfg.num_users * cfg.num_days
    n_req = rng.poisson(cfg.exposures_per_user_day * share[name] / _SLATES[name], user_days)
    req_userday = np.repeat(np.arange(user_days), n_req)
    per_day = sessions.per_day.ravel()
    req_sess = sessions.first[req_userday] + np.floor(
        rng.random(len(req_userday)) * per_day[req_userday]
    ).astype(np.int64)
    req_ts = sessions.ts[req_sess] + rng.integers(*REQUEST_OFFSET_SECONDS, len(req_sess))
    req_ts = np.clip(req_ts, sessions.day_start[req_sess], sessions.day_start[req_sess] + DAY - 1)
    return req_sess, req_ts


def _draw_rows(sim: _Sim, name: str, request_base: int) -> _Rows:
    """Draws scenario ``name``'s requests, expands them into slate rows and picks their items:
    from the session's intent category with ``intent_show_prob`` in intent sessions, else
    uniform in the scenario's catalogue. Request ids start at ``request_base``."""
    cfg, rng, world, sessions = sim.cfg, sim.rng, sim.world, sim.sessions
    req_sess, req_ts = _draw_requests(sim, name)
    slate = _SLATES[name]
    rows = np.repeat(np.arange(len(req_sess)), slate)
    sess = req_sess[rows]
    users, ts = sessions.user[sess], req_ts[rows]
    n = len(rows)
    lo, hi = world.ranges[name]
    items = rng.integers(lo, hi, n)
    show_intent = (sessions.intent[sess] >= 0) & (rng.random(n) < cfg.intent_show_prob)
    items[show_intent] = world.item_in_category(sessions.intent[sess][show_intent], name)
    cat = world.item_cat[items]
    affinity = world.affinity(users, items)
    intent_hit = (sessions.intent[sess] == cat) & (sessions.burst_first[sess] < ts)
    base = world.item_bias[items] + cfg.taste_weight[name] * affinity
    return _Rows(
        request=rows,
        request_id=(request_base + rows).astype(np.int64),
        position=np.tile(np.arange(slate), len(req_sess)),
        user=users,
        ts=ts,
        item=items,
        local_item=items - lo,
        category=cat,
        affinity=affinity,
        intent_hit=intent_hit,
        base_logit=base + cfg.intent_weight[name] * intent_hit,
        num_requests=len(req_sess),
    )


def _feed_features(sim: _Sim, rows: _Rows) -> _Features:
    """feed: clicks fall with position and price, shift a little by age; orders follow taste
    and price."""
    cfg, rng, world = sim.cfg, sim.rng, sim.world
    age_effect = rng.normal(0.0, 0.15, NUM_AGE_BUCKETS)
    log_price = rng.normal(0.0, 0.5, cfg.num_items)[rows.item]
    click_logit = -1.3 + rows.base_logit - 0.15 * rows.position - 0.5 * log_price
    click_logit = click_logit + age_effect[world.age_bucket[rows.user]]
    order_logit = -0.8 + ORDER_TASTE_WEIGHT["feed"] * rows.affinity - 1.2 * log_price
    features: Dict[str, object] = dict(
        age_bucket=world.age_bucket[rows.user],
        gender=world.gender[rows.user],
        item_id=rows.local_item,
        category=rows.category,
        position=rows.position,
        price=np.round(np.exp(log_price), 2),
    )
    return click_logit, order_logit, features


def _search_features(sim: _Sim, rows: _Rows) -> _Features:
    """search: clicks fall with distance, grow with rating, shift by brand and city; a few
    brands are null; no order task."""
    cfg, rng, world = sim.cfg, sim.rng, sim.world
    n = len(rows)
    city_effect = rng.normal(0.0, 0.1, NUM_CITIES)
    item_rating = rng.uniform(3.0, 5.0, cfg.num_items)[rows.item]
    item_brand = rng.integers(0, NUM_BRANDS, cfg.num_items)[rows.item]
    brand_effect = rng.normal(0.0, 0.3, NUM_BRANDS)
    distance = rng.exponential(3.0, n)
    click_logit = -1.0 + rows.base_logit - 0.2 * np.minimum(distance, 10.0)
    click_logit = click_logit + 0.6 * (item_rating - 4.0) + brand_effect[item_brand]
    click_logit = click_logit + city_effect[world.city[rows.user]]
    brand_null = rng.random(n) < 0.03  # missing brand: the contract's null
    features: Dict[str, object] = dict(
        city=world.city[rows.user],
        poi_id=rows.local_item,
        poi_cat=sim.search_cat_perm[rows.category],
        brand=pa.array(item_brand, mask=brand_null),
        distance_bucket=np.minimum(distance.astype(np.int64), 7),
        hour=(rows.ts - cfg.start_ts) % DAY // 3600,
        distance_km=np.round(distance, 3),
        rating=np.round(item_rating, 1),
    )
    return click_logit, None, features


def _coupon_features(sim: _Sim, rows: _Rows) -> _Features:
    """coupon: clicks and orders grow with the discount; clicks also with the VIP level."""
    rng, world = sim.rng, sim.world
    discount = rng.uniform(0.0, 0.5, len(rows))
    click_logit = -1.0 + rows.base_logit + 3.0 * (discount - 0.25) + 0.15 * world.vip[rows.user]
    order_logit = -0.3 + ORDER_TASTE_WEIGHT["coupon"] * rows.affinity + 2.0 * discount
    features: Dict[str, object] = dict(
        vip_level=world.vip[rows.user],
        age_bucket=world.age_bucket[rows.user],
        coupon_id=rows.local_item,
        category=rows.category,
        discount=np.round(discount, 3),
    )
    return click_logit, order_logit, features


# Each scenario's own features and logits, drawn in this order (the draws' order is the data).
_SCENARIO_FEATURES: Dict[str, Callable[[_Sim, _Rows], _Features]] = {
    "feed": _feed_features,
    "search": _search_features,
    "coupon": _coupon_features,
}


def _draw_exposures(
    sim: _Sim, name: str, rows: _Rows, echoes: _Echoes
) -> Tuple[pa.Table, Dict[str, np.ndarray]]:
    """Draws scenario ``name``'s features and labels (order => click), echoes the labels into
    ``echoes``, and returns its exposure table and truth, both in time order."""
    rng, n = sim.rng, len(rows)
    click_logit, order_logit, features = _SCENARIO_FEATURES[name](sim, rows)
    cols: Dict[str, object] = {
        "user_id": rows.user.astype(np.int64),
        "ts": rows.ts.astype(np.int64),
        "request_id": rows.request_id,
        **features,
    }
    users, ts, items = rows.user, rows.ts, rows.item
    click = rng.random(n) < _sigmoid(click_logit)
    cols["click"] = click
    if order_logit is not None:
        order = click & (rng.random(n) < _sigmoid(order_logit))  # funnel: order => click
        cols["order"] = order
        echoes.orders.append((users[order], ts[order] + rng.integers(60, 600, order.sum()), items[order]))
    echoes.clicks.append((users[click], ts[click] + rng.integers(1, 21, click.sum()), items[click]))
    # Rows in time order (a request's slate in position order); truth follows the rows.
    by_time = np.lexsort((rows.position, rows.request, ts))
    table = _exposure_table(cols, sim.schema.scenario(name)).take(by_time)
    p_click = _sigmoid(click_logit)
    truth = {
        "affinity": rows.affinity[by_time],
        "intent_hit": rows.intent_hit[by_time],
        "click_logit": click_logit[by_time],
        "category": rows.category[by_time],
        "p_click": p_click[by_time],
    }
    if order_logit is not None:
        truth["p_order"] = (p_click * _sigmoid(order_logit))[by_time]
    return table, truth


def _behaviors(
    cfg: SyntheticConfig, world: _World, sessions: _Sessions, echoes: _Echoes
) -> Dict[str, pa.Table]:
    """The behaviour tables. Orders: background over history days + exposure days, plus echoed
    orders. Real-time clicks: background (from the day before the first exposure day), bursts,
    echoed clicks."""
    bg = world.background(cfg.orders_per_day, -cfg.history_days, cfg.num_days)
    orders = _concat([bg] + echoes.orders)
    bg_rt = world.background(cfg.browses_per_day, -1, cfg.num_days)
    bursts = (sessions.user[sessions.burst_session], sessions.burst_ts, sessions.burst_items)
    clicks = _concat([bg_rt, bursts] + echoes.clicks)
    return {
        "orders": _behavior_table(*orders, world.item_cat),
        "clicks_rt": _behavior_table(*clicks, world.item_cat),
    }


def simulate(cfg: SyntheticConfig) -> SyntheticData:
    """Draws the whole dataset in memory (tables in contract columns) with its ground truth.

    Every draw comes from one generator, so the phases run in a fixed order: the world, the
    sessions, search's category permutation, then feed, search and coupon (rows, features,
    labels), then the background behaviours.
    """
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)  # the first draws: world_of() replays them
    sessions = _draw_sessions(cfg, rng, world)
    sim = _Sim(cfg, rng, world, sessions, rng.permutation(cfg.num_categories), build_schema(cfg))
    exposures: Dict[str, pa.Table] = {}
    truth: Dict[str, Dict[str, np.ndarray]] = {}
    echoes = _Echoes()
    request_base = 0
    for name in ("feed", "search", "coupon"):
        rows = _draw_rows(sim, name, request_base)
        request_base += rows.num_requests
        exposures[name], truth[name] = _draw_exposures(sim, name, rows, echoes)
    behaviors = _behaviors(cfg, world, sessions, echoes)
    return SyntheticData(sim.schema, exposures, behaviors, truth)


def world_of(cfg: SyntheticConfig) -> _World:
    """The users and items :func:`simulate` draws for ``cfg``: the world is its first draws from
    the seed, so it is the same without drawing the rest (``mtfm_rec.bench.references``' plug-in
    reference replays the truth with it)."""
    cfg.validate()
    return _World(cfg, np.random.default_rng(cfg.seed))


def generator_config(schema: DatasetSchema) -> SyntheticConfig:
    """The :class:`SyntheticConfig` a dataset was generated with, from its dataset.yaml.

    Raises:
        ValueError: the dataset was not written by this generator, or by a version of it that did
            not record every field (the weights of the planted effects were added later).
    """
    record = schema.extra.get("generator", {})
    if record.get("module") != GENERATOR_MODULE:
        raise ValueError(
            f"dataset {schema.name!r} was not written by {GENERATOR_MODULE} (no generator record)"
        )
    fields = {f: v for f, v in record.items() if f != "module"}
    missing = sorted(set(SyntheticConfig.__dataclass_fields__) - set(fields))
    if missing:
        raise ValueError(f"dataset {schema.name!r}: the generator record lacks {missing}; regenerate it")
    return SyntheticConfig(**fields)


TRUTH_DIR = "truth"
TRUTH_COLUMNS = ("category", "p_click", "p_order", "affinity", "intent_hit")


def write_truth(out: str, data: SyntheticData, files_per_folder: int) -> None:
    """Writes the ground truth beside the data: ``out/truth/<scenario>/part-NNNNN.parquet``.

    Each truth file holds the rows of the exposure file of the same name, in the same order
    (``user_id``, ``ts``, ``request_id`` and the labels repeat them, so a reader can check the
    alignment), plus :data:`TRUTH_COLUMNS` (``p_order`` only where the scenario has an order
    task). The reader of the raw contract ignores the folder; nothing of it reaches a model.
    """
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{TRUTH_DIR}"):
        fs.rm(f"{root}/{TRUTH_DIR}", recursive=True)
    for name, table in data.exposures.items():
        cols = {c: table[c] for c in ("user_id", "ts", "request_id", *data.schema.scenario(name).tasks)}
        for c in TRUTH_COLUMNS:
            if c in data.truth[name]:
                cols[c] = pa.array(data.truth[name][c])
        write_by_user(fs, f"{root}/{TRUTH_DIR}/{name}", pa.table(cols), files_per_folder)


def read_truth(root: str, scenario: str) -> pa.Table:
    """The truth rows of ``scenario`` in the row order of its exposure files (sorted file names).

    Raises:
        FileNotFoundError: no truth for ``scenario`` (only this generator writes it).
    """
    try:
        return read_parquet_folder(root, f"{TRUTH_DIR}/{scenario}")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}; only datasets written by mtfm_rec.data.synthetic carry the truth"
        ) from None


def _concat(parts: List[_Actions]) -> _Actions:
    users, ts, items = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return users, ts, items


def _exposure_table(cols: Mapping[str, object], spec: ScenarioSpec) -> pa.Table:
    """Contract column order and types: ids int64, dense float32, labels int8."""
    arrays: Dict[str, pa.Array] = {}
    for c in ("user_id", "ts", "request_id"):
        arrays[c] = pa.array(cols[c], pa.int64())
    for _, c, _ in spec.categorical():
        value = cols[c]
        arrays[c] = value.cast(pa.int64()) if isinstance(value, pa.Array) else pa.array(value, pa.int64())
    for c in spec.dense_features:
        arrays[c] = pa.array(np.asarray(cols[c], np.float32))
    for t in spec.tasks:
        arrays[t] = pa.array(np.asarray(cols[t], np.int8))
    return pa.table(arrays)


def _behavior_table(users: np.ndarray, ts: np.ndarray, items: np.ndarray, item_cat: np.ndarray) -> pa.Table:
    order = np.lexsort((items, ts, users))
    return pa.table(
        {
            "user_id": pa.array(users[order], pa.int64()),
            "ts": pa.array(ts[order], pa.int64()),
            "item_id": pa.array(items[order], pa.int64()),
            "category": pa.array(item_cat[items[order]], pa.int64()),
        }
    )


def generate(
    out: str,
    num_users: int = 2000,
    num_days: int = 7,
    exposures_per_user_day: float = 12.0,
    num_items: int = 3000,
    num_categories: int = 16,
    history_days: int = 14,
    files_per_folder: int = 2,
    seed: int = 0,
    **overrides: object,
) -> DatasetSchema:
    """Generates a synthetic dataset into ``out`` and returns its schema.

    Args:
        out: dataset root, a local path or an fsspec URL (``memory://...``, ``s3://...``).
        num_users: users; all of them have exposures, orders and real-time clicks.
        num_days: days with exposures (>= 3); the last two are the recommended valid and test days.
        exposures_per_user_day: mean exposures per user and day over all scenarios.
        num_items: global items (behaviour vocabulary), split into the scenario catalogues.
        num_categories: categories shared by all scenarios (search permutes their ids).
        history_days: days of order history before the first exposure day.
        files_per_folder: Parquet files per exposure/behaviour folder.
        seed: the only source of randomness.
        **overrides: any other :class:`SyntheticConfig` field.

    Returns:
        The schema also written to ``out/dataset.yaml``.
    """
    cfg = SyntheticConfig(
        num_users=num_users,
        num_days=num_days,
        exposures_per_user_day=exposures_per_user_day,
        num_items=num_items,
        num_categories=num_categories,
        history_days=history_days,
        files_per_folder=files_per_folder,
        seed=seed,
        **overrides,  # type: ignore[arg-type]
    )
    return _simulate_and_write(out, cfg).schema


def _simulate_and_write(out: str, cfg: SyntheticConfig) -> SyntheticData:
    """Draws the dataset of ``cfg`` and writes it with its truth under ``out``."""
    data = simulate(cfg)
    write_truth(out, data, cfg.files_per_folder)  # before the data: dataset.yaml, written last, covers both
    write_raw_dataset(out, data.schema, data.exposures, data.behaviors, cfg.files_per_folder)
    return data


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="dataset root (path or fsspec URL)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--exposures-per-day", type=float, default=12.0, help="per user, all scenarios")
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--categories", type=int, default=16)
    parser.add_argument("--history-days", type=int, default=14)
    parser.add_argument("--files-per-folder", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--alignment-free",
        action="store_true",
        help="declare no shared_embeddings: the model must align sequence and exposure ids itself",
    )
    args = parser.parse_args(argv)
    t0 = time.time()
    cfg = SyntheticConfig(
        num_users=args.users,
        num_days=args.days,
        exposures_per_user_day=args.exposures_per_day,
        num_items=args.items,
        num_categories=args.categories,
        history_days=args.history_days,
        files_per_folder=args.files_per_folder,
        seed=args.seed,
        shared_embeddings=not args.alignment_free,
    )
    data = _simulate_and_write(args.out, cfg)
    for kind, tables in (("exposures", data.exposures), ("behaviors", data.behaviors)):
        for name, table in tables.items():
            print(f"{kind}/{name}: {table.num_rows:,} rows")
    print(
        f"wrote {args.out} in {time.time() - t0:.1f}s; recommended "
        f"valid_after={data.schema.extra['recommended_valid_after']} "
        f"eval_after={data.schema.extra['recommended_eval_after']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
