"""The model configuration: one frozen, validated record, the model built from it."""

from __future__ import annotations

import dataclasses

import pytest

from spherical_channels.models import SCN
from spherical_channels.models.config import ConfigError, SCNConfig

SMALL = dict(num_interactions=1, lmax=2, mmax=1, sphere_channels=4, sphere_channels_reduce=4, hidden_channels=8,
             num_sphere_samples=8, num_basis_functions=4, cutoff=4.0)


def test_defaults_are_the_official_ones() -> None:
    config = SCNConfig()
    assert (config.max_num_neighbors, config.cutoff, config.lmax, config.mmax, config.num_interactions) == (20, 8.0, 6, 1, 8)
    assert (config.sphere_channels, config.hidden_channels, config.num_sphere_samples) == (128, 256, 128)
    assert config.distance_function == "gaussian" and config.num_taps == -1 and config.use_grid


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lmax": 11}, "lmax must be in 1..10"),
        ({"mmax": 3, "lmax": 2}, "mmax must be in 0..lmax"),
        ({"roll": "sometimes"}, "roll must be one of"),
        ({"distance_function": "bessel"}, "distance_function must be one of"),
        ({"use_grid": "yes"}, "use_grid must be true or false"),
        ({"cutoff": -1.0}, "cutoff must be > 0"),
        ({"lmax": 2.5}, "lmax must be an integer"),
        ({"num_bands": 3}, "num_bands must be 1 or 2"),
    ],
)
def test_invalid_options_are_refused_by_name(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SCNConfig(**changes)


def test_official_attributes_convert_and_round_trip() -> None:
    official = {"num_atoms": 0, "bond_feat_dim": 50, "num_targets": 1, "name": "scn", "lmax": 4, "cutoff": 6}
    config = SCNConfig.from_official(official)
    assert config.lmax == 4 and config.cutoff == 6.0 and isinstance(config.cutoff, float)
    assert SCNConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="not SCN"):
        SCNConfig.from_official({"name": "schnet"})
    with pytest.raises(ConfigError, match="unknown SCN options"):
        SCNConfig.from_dict({"lmaxx": 3})


def test_model_exposes_its_config_read_only() -> None:
    model = SCN(**SMALL)
    assert model.config == SCNConfig(**SMALL)
    assert SCN(SCNConfig(**SMALL)).config == model.config
    assert model.lmax == 2 and model.cutoff == 4.0  # options read as attributes
    with pytest.raises(AttributeError, match="frozen configuration"):
        model.roll = "fixed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.roll = "fixed"  # type: ignore[misc]
    model.update_config(roll="fixed")
    assert model.roll == "fixed" and model.config.roll == "fixed"  # what a checkpoint records
    with pytest.raises(ConfigError, match="build a new model"):
        model.update_config(lmax=3)


def test_keyword_construction_matches_config_construction() -> None:
    import torch

    torch.manual_seed(0)
    a = SCN(**SMALL)
    torch.manual_seed(0)
    b = SCN(SCNConfig(**SMALL))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
