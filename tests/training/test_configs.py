"""Every configuration shipped in configs/ parses; the small ones build their model."""

from __future__ import annotations

from pathlib import Path

import pytest

from spherical_channels.models.registry import model_spec
from spherical_channels.training.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER = sorted((CONFIGS / "paper").glob("scn_*.yaml"))
SMALL = sorted((CONFIGS / "small").glob("*.yaml"))


def test_the_paper_configs_are_all_there() -> None:
    assert len(PAPER) == 18 and len(SMALL) >= 5


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_parses(path: Path) -> None:
    config = load_config(path)
    assert config.model["num_interactions"] in (12, 16)
    assert config.optim.max_epochs == 12 and config.optim.lr_gamma == 0.3
    assert len(config.optim.lr_milestones) == 4
    # milestones at epochs 5, 7, 9, 11 of OC20 2M at 16 x batch_size structures per step
    steps_per_epoch = 2_000_000 // (16 * config.optim.batch_size)
    assert config.optim.lr_milestones == [e * steps_per_epoch for e in (5, 7, 9, 11)]


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.stem)
def test_small_config_builds_its_model(path: Path) -> None:
    config = load_config(path)
    assert config.train.path.endswith("train.extxyz")
    spec = model_spec(config.model_name)  # scn, or schnet (configs/small/schnet.yaml)
    model = spec.build(config.model)
    assert isinstance(model, spec.model_class) and model.num_params > 1000


def test_includes_merge_and_cycles(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model: {lmax: 4, mmax: 1}\noptim: {max_steps: 5}\ndataset: {train: a.xyz}\n")
    (tmp_path / "child.yaml").write_text("includes: base.yaml\nmodel: {mmax: 0}\n")
    config = load_config(tmp_path / "child.yaml")
    assert config.model == {"lmax": 4, "mmax": 0} and config.optim.max_steps == 5
    (tmp_path / "loop.yaml").write_text("includes: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
