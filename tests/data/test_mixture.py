"""Extra passes over a scenario (``data.loader.extra_passes``): the interleaving, its epochs,
exact resume, and the errors."""

from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest
from test_loader import ids_with_restarts, loader, write_dataset

from mtfm_rec.config import ConfigError, from_dict
from mtfm_rec.data.config import DataConfig, LoaderConfig
from mtfm_rec.data.errors import LoaderError
from mtfm_rec.data.loader import ResumableLoader
from mtfm_rec.data.mixture import MixtureLoader, interleave_schedule, train_loader_from_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("agg"))
    write_dataset(root, [23, 17, 11, 9], row_group_size=6)  # 60 samples, some without a "b"
    return root


KW: Any = dict(split="all", batch_size=3, shuffle=True, shuffle_buffer=10, seed=3)


def mixture(path: str, workers: int = 0) -> MixtureLoader:
    """The main loader of every scenario plus one pass over scenario "b"'s samples."""
    return MixtureLoader(
        [
            ("main", loader(path, workers, **KW)),
            ("b#1", loader(path, workers, **{**KW, "seed": 4}, scenarios=["b"])),
        ]
    )


def ids(batches: Any) -> List[List[int]]:
    return [b.user_id.tolist() for b in batches]


def test_interleave_schedule_spreads_every_source_evenly() -> None:
    assert interleave_schedule([3, 1]).tolist() == [0, 0, 1, 0]
    assert interleave_schedule([0, 2]).tolist() == [1, 1]
    assert interleave_schedule([]).tolist() == []
    counts = [20, 7, 3]
    schedule = interleave_schedule(counts)
    assert np.bincount(schedule).tolist() == counts
    n = len(schedule)
    for i in range(n + 1):  # every prefix holds each source's share, give or take one batch
        done = np.bincount(schedule[:i], minlength=3)
        assert np.all(np.abs(done - np.array(counts) * i / n) <= 1)


def test_an_epoch_is_every_source_epoch_interleaved(data_dir: str) -> None:
    main = ids(loader(data_dir, **KW))
    extra_loader = loader(data_dir, **{**KW, "seed": 4}, scenarios=["b"])
    extra_batches = list(extra_loader)
    assert extra_batches and all(b.labels["a"].shape[0] == 0 for b in extra_batches)  # b's only
    assert extra_loader.dataset.num_samples < 60  # samples without a "b" exposure are not repeated
    mix = mixture(data_dir)
    got = list(mix)
    assert len(got) == mix.num_batches() == len(main) + len(extra_batches)
    schedule = interleave_schedule([len(main), len(extra_batches)])
    assert [b.user_id.tolist() for b, s in zip(got, schedule) if s == 0] == main
    assert [b.user_id.tolist() for b, s in zip(got, schedule) if s == 1] == ids(extra_batches)
    assert mix.epoch == 1 and mix.batches_in_epoch == 0
    main_loader = loader(data_dir, **KW)
    ids(main_loader)
    second = ids(mix)  # the next epoch: each source's own next-epoch shuffle
    assert [b for b, s in zip(second, schedule) if s == 0] == ids(main_loader)
    assert second != ids(got)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_rest(data_dir: str, workers: int) -> None:
    full = mixture(data_dir, workers)
    per_epoch = full.num_batches()
    reference = ids(full.iter_batches(num_epochs=2))
    stops = (1, 4, per_epoch - 1, per_epoch, per_epoch + 5, 2 * per_epoch)
    assert ids_with_restarts(lambda: mixture(data_dir, workers), stops, per_epoch) == reference


def test_a_state_of_other_sources_is_refused(data_dir: str) -> None:
    plain = loader(data_dir, **KW).state_dict()
    with pytest.raises(LoaderError, match="not a mixture state.*extra_passes changed"):
        mixture(data_dir).load_state_dict(plain)
    state = mixture(data_dir).state_dict()
    with pytest.raises(LoaderError, match=r"extra passes \(sources \['main', 'b#1'\]\); this run has none"):
        loader(data_dir, **KW).load_state_dict(state)
    other = MixtureLoader(
        [("main", loader(data_dir, **KW)), ("a#1", loader(data_dir, **KW, scenarios=["a"]))]
    )
    with pytest.raises(LoaderError, match=r"sources \['main', 'b#1'\].*\['main', 'a#1'\]"):
        other.load_state_dict(state)
    reseeded = MixtureLoader(
        [("main", loader(data_dir, **KW)), ("b#1", loader(data_dir, **KW, scenarios=["b"]))]
    )
    with pytest.raises(LoaderError, match="source 'b#1' does not match.*seed"):
        reseeded.load_state_dict(state)


def test_a_resharded_state_resumes_the_same_fraction(data_dir: str) -> None:
    ld = mixture(data_dir)
    state = {k: v for k, v in ld.state_dict().items() if k != "sources"}  # per-rank keys dropped
    state.update(epoch=1, batches_in_epoch=ld.num_batches() // 2, resharded_from=2)
    ld.load_state_dict(state)
    assert (ld.epoch, ld.batches_in_epoch) == (1, ld.num_batches() // 2)


def test_from_config_builds_the_passes_and_names_bad_scenarios(data_dir: str) -> None:
    def data(**loader_kw: Any) -> DataConfig:
        return DataConfig(eval_after=1400, loader=LoaderConfig(batch_size=3, **loader_kw))

    assert isinstance(train_loader_from_config(data_dir, data(), rank=0, world_size=1), ResumableLoader)
    plain = train_loader_from_config(data_dir, data(extra_passes={"b": 0}), rank=0, world_size=1)
    assert isinstance(plain, ResumableLoader)
    mix = train_loader_from_config(data_dir, data(extra_passes={"b": 2}), rank=0, world_size=1)
    assert isinstance(mix, MixtureLoader)
    assert [name for name, _ in mix.sources] == ["main", "b#1", "b#2"]
    seeds = [src.dataset.seed for _, src in mix.sources]
    assert len(set(seeds)) == 3  # each pass its own shuffle
    assert all(src.dataset.scenarios == ("b",) for _, src in mix.sources[1:])
    with pytest.raises(LoaderError, match=r"extra_passes: scenario 'c' is not trained.*\['a', 'b'\]"):
        train_loader_from_config(data_dir, data(extra_passes={"c": 1}), rank=0, world_size=1)
    only_a = DataConfig(eval_after=1400, scenarios=["a"], loader=LoaderConfig(extra_passes={"b": 1}))
    with pytest.raises(LoaderError, match=r"scenario 'b' is not trained.*data.scenarios=\['a'\]"):
        train_loader_from_config(data_dir, only_a, rank=0, world_size=1)


def test_a_negative_pass_count_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"extra_passes values must be integers >= 0, got \{'b': -1\}"):
        from_dict(LoaderConfig, {"extra_passes": {"b": -1}})
