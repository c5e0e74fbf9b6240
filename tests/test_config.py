"""Config composition, bad overrides, and the JSON round trip to the sites."""

from __future__ import annotations

import pytest

from fl_app.config import ConfigError, compose_config, from_json, to_json


def test_default_config_is_the_embedded_breast_cancer_run() -> None:
    cfg = compose_config("")
    assert cfg.task.name == "breast_cancer"
    assert cfg.strategy.name == "fedavg"
    assert cfg.privacy.name == "none"
    assert "hydra" not in cfg


def test_overrides_select_groups_and_set_keys() -> None:
    cfg = compose_config(
        "task=heart_disease strategy=fedprox num_rounds=20 strategy.proximal_mu=0.5"
    )
    assert cfg.task.name == "heart_disease"
    assert cfg.task.protocol == "flamby"
    assert cfg.strategy.proximal_mu == 0.5
    assert cfg.num_rounds == 20


def test_quoted_values_with_spaces_survive() -> None:
    cfg = compose_config("'output_dir=/tmp/with space'")
    assert cfg.output_dir == "/tmp/with space"


def test_unknown_group_option_names_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match=r"'task' must be one of: .*breast_cancer.*heart_disease"):
        compose_config("task=lung_cancer")


def test_unknown_key_is_named_with_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'num_round'.*num_rounds"):
        compose_config("num_round=3")
    with pytest.raises(ConfigError, match=r"unknown key 'task.learning_rate'.*lr"):
        compose_config("task.learning_rate=0.1")


@pytest.mark.parametrize(
    ("override", "key"),
    [("num_rounds=abc", "num_rounds"), ("seed=1.5", "seed"), ("task.lr=fast", "task.lr")],
)
def test_wrong_type_is_rejected_with_key_and_expected_type(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' expects"):
        compose_config(override)


def test_int_is_accepted_where_a_float_is_expected() -> None:
    assert compose_config("task.lr=1").task.lr == 1


def test_config_round_trips_through_json() -> None:
    cfg = compose_config("task=heart_disease num_rounds=3")
    assert from_json(to_json(cfg)) == cfg


def test_experiment_preset_sets_groups_and_command_line_wins() -> None:
    cfg = compose_config("experiment=heart_disease_fedprox_mlp num_rounds=5")
    assert (cfg.task.name, cfg.task.model, cfg.strategy.name) == ("heart_disease", "mlp", "fedprox")
    assert cfg.partition.name == "natural"
    assert cfg.num_rounds == 5


def test_unknown_key_lists_the_keys_of_the_option_actually_selected() -> None:
    # The key list comes from privacy=local_dp (selected in the same overrides), not `none`.
    with pytest.raises(ConfigError, match=r"unknown key 'privacy.delta'.*max_grad_norm.*"
                                          r"target_delta"):
        compose_config("privacy=local_dp privacy.delta=1e-5")


def test_a_key_added_with_plus_must_be_in_the_schema() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'task.foo'.*Valid keys under 'task'"):
        compose_config("+task.foo=1")
    with pytest.raises(ConfigError, match=r"unknown key 'privacy.budget.foo'.*per_site"):
        compose_config("privacy=local_dp +privacy.budget.foo=3")
    cfg = compose_config("privacy=local_dp +privacy.budget.per_site.cleveland.epsilon=2.0")
    assert cfg.privacy.budget.per_site.cleveland.epsilon == 2.0


def test_values_are_typed_by_the_schema() -> None:
    cfg = compose_config("task.lr=1 partition=quantity partition.sizes=[5,3,2]")
    assert isinstance(cfg.task.lr, float)
    assert cfg.partition.sizes == [5.0, 3.0, 2.0]
    assert from_json(to_json(cfg)).task.lr == 1.0


@pytest.mark.parametrize(
    "group", ["task", "strategy", "privacy", "secagg", "partition"],
)
def test_every_group_option_is_typed_by_a_schema(group: str) -> None:
    import dataclasses

    from omegaconf import OmegaConf

    from fl_app.config import CONF_DIR

    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        node = compose_config(f"{group}={option}")[group]
        assert dataclasses.is_dataclass(OmegaConf.get_type(node)), f"{group}/{option}.yaml"
