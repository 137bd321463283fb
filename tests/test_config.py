"""Typed configs: YAML + dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from mtfm_rec.config import ConfigError, load_config


def test_overrides_reach_nested_typed_fields(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\ndata:\n  aggregation:\n    window_seconds: 60\n")
    cfg = load_config(str(path), ["train.lr=1e-3", "data.aggregation.num_partitions=3"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.aggregation.window_seconds == 60
    assert cfg.data.aggregation.num_partitions == 3


def test_unknown_key_names_file_and_key(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match=r"c\.yaml\.train: unknown key\(s\) \['lrr'\]"):
        load_config(str(path))


def test_wrong_type_names_the_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"config\.train\.lr: expected a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"data\.aggregation\.window_seconds: expected an int"):
        load_config(None, ["data.aggregation.window_seconds=1.5"])


def test_enum_like_fields_are_literals_checked_at_load(tmp_path) -> None:
    """A value outside a Literal field's choices names the file, the dotted key and the choices;
    the checks of programmatic construction use the same tuples."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  early_stopping_metric: ndcg\n")
    with pytest.raises(
        ConfigError,
        match=r"c\.yaml\.train\.early_stopping_metric must be one of "
        r"\('auc', 'gauc', 'logloss'\), got 'ndcg'",
    ):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"config\.data\.aggregation\.start_method must be one of"):
        load_config(None, ["data.aggregation.start_method=thread"])
    with pytest.raises(
        ConfigError, match=r"config\.train\.backend must be one of \('auto', 'gloo', 'nccl'\), got 'mpi'"
    ):
        load_config(None, ["train.backend=mpi"])
    with pytest.raises(ConfigError, match=r"config\.train\.dense_parallel must be one of .*got True"):
        load_config(None, ["train.dense_parallel=true"])  # YAML's true is not a choice
    cfg = load_config(
        None, ["train.lr_decay=cosine", "train.device=cpu", "data.aggregation.start_method=spawn"]
    )
    assert (cfg.train.lr_decay, cfg.train.device, cfg.data.aggregation.start_method) == (
        "cosine",
        "cpu",
        "spawn",
    )

    from mtfm_rec.training.config import TrainConfig

    with pytest.raises(ValueError, match=r"early_stopping_metric must be one of"):
        TrainConfig(early_stopping_metric="ndcg")  # type: ignore[arg-type]


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["train.lr"])


def test_base_chain_merges_sections_and_detects_loops(tmp_path) -> None:
    (tmp_path / "model.yaml").write_text("model:\n  d_model: 48\n  num_blocks: 3\ntrain:\n  lr: 0.01\n")
    (tmp_path / "mix.yaml").write_text("base: model.yaml\nmodel:\n  num_blocks: 1\ntrain:\n  max_steps: 7\n")
    cfg = load_config(str(tmp_path / "mix.yaml"), ["train.lr=0.5"])
    assert (cfg.model.d_model, cfg.model.num_blocks) == (48, 1)  # merged key by key
    assert (cfg.train.lr, cfg.train.max_steps) == (0.5, 7)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base chain loops back"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(str(tmp_path / "c.yaml"))


def test_split_boundaries_must_be_ordered() -> None:
    # an empty validation split was accepted silently; its NaN AUC then picked the best model
    for valid, test in ((200, 100), (100, 100)):
        with pytest.raises(
            ConfigError,
            match=rf"config\.data: data\.valid_after={valid} must be earlier than data\.eval_after={test}: "
            r"validation is valid_after <= ts < eval_after, which would be empty",
        ):
            load_config(None, [f"data.valid_after={valid}", f"data.eval_after={test}"])
    cfg = load_config(None, ["data.valid_after=100", "data.eval_after=200"])
    assert (cfg.data.valid_after, cfg.data.eval_after) == (100, 200)
    assert load_config(None, ["data.valid_after=300"]).data.eval_after is None  # one alone is fine


def test_unknown_eval_split_is_refused_at_load() -> None:
    # was refused by the loader only after the whole training had run
    with pytest.raises(
        ConfigError,
        match=r"config\.train: eval_splits: \['tset'\] not among the splits "
        r"\['train', 'valid', 'test', 'all'\]",
    ):
        load_config(None, ["train.eval_splits=[test, tset]"])
    assert load_config(None, ["train.eval_splits=[valid, test, all]"]).train.eval_splits == [
        "valid",
        "test",
        "all",
    ]


def test_eval_splits_are_the_loaders_splits() -> None:
    from mtfm_rec.data.splits import SPLITS
    from mtfm_rec.training.config import EVAL_SPLITS

    assert EVAL_SPLITS == SPLITS
