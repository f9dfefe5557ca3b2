"""SchNet in the training framework: ``scn train`` with ``model.name: schnet``, resuming, and
``scn eval`` / ``scn predict`` on its checkpoint, on the tiny EMT data (the model itself:
``tests/models/test_schnet.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.io import read

from spherical_channels.cli import main
from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models import SchNet
from spherical_channels.models.checkpoint import load_model, read_checkpoint
from spherical_channels.models.schnet_config import SchNetConfig

TINY = dict(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=16, cutoff=5.0)


@pytest.fixture(scope="module")
def trained_schnet(tiny_reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`scn train` with ``model.name: schnet`` on the tiny data (4 steps, then resumed to 6)."""
    out = tmp_path_factory.mktemp("schnet") / "run"
    config = out.parent / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "schnet", **TINY},
        "optim": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1, "lr_initial": 2e-3},
        "dataset": {"train": str(tiny_reference / "s2ef" / "train.extxyz"), "val": str(tiny_reference / "s2ef" / "val_id.extxyz")},
        "run": {"output_dir": str(out), "progress": False, "plots": False},
    }))
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "--resume", "--set", "optim.max_steps=6"]) == 0
    return out


def test_scn_train_writes_a_schnet_run(trained_schnet: Path) -> None:
    last = read_checkpoint(trained_schnet / "checkpoints" / "last.pt")
    assert last["trainer_state"]["step"] == 6 and last["model_name"] == "schnet"
    assert last["config"]["model"]["name"] == "schnet" and "zbl" not in last["model_config"]
    model = load_model(trained_schnet / "checkpoints" / "best.pt")  # EMA weights
    assert isinstance(model, SchNet) and model.config == SchNetConfig(**TINY)
    # the trainer's normalisation: one scale (the force RMS) and per-element reference energies
    statistics = last["statistics"]
    assert float(model.energy_scale) == pytest.approx(statistics["force_rms"], rel=1e-6)
    for z, e in statistics["element_energies"].items():
        assert float(model.element_energies[int(z)]) == pytest.approx(e, rel=1e-6, abs=1e-6)
    summary = json.loads((trained_schnet / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_val"]["num_structures"] > 0


def test_training_a_schnet_lowers_its_errors(tiny_reference: Path, tmp_path: Path) -> None:
    """The trainer's loop on a SchNet (forces -dE/dx, trained through their derivative):
    60 steps on the tiny EMT data (measured: energy/atom MAE 0.48 -> 0.01 eV, force L2MAE
    0.63 -> 0.33 eV/A)."""
    from spherical_channels.training import TrainConfig, Trainer

    config = TrainConfig.from_dict({
        "model": {"name": "schnet", **TINY},
        "optim": {"batch_size": 4, "lr_initial": 3e-3, "warmup_steps": 2, "scheduler": "cosine", "max_steps": 60},
        "dataset": {"train": str(tiny_reference / "s2ef" / "train.extxyz")},
        "run": {"output_dir": str(tmp_path / "run"), "progress": False, "plots": False, "log_every": 20},
    })
    with Trainer(config) as trainer:
        assert isinstance(trainer.model, SchNet)
        before = trainer.validate(trainer.train_data)
        trainer.train()
        after = trainer.validate(trainer.train_data)
    assert after["energy_mae_per_atom"] < 0.2 * before["energy_mae_per_atom"]
    assert after["force_l2mae"] < 0.8 * before["force_l2mae"]


def test_resuming_with_another_model_is_refused(trained_schnet: Path, tiny_reference: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((trained_schnet.parent / "config.yaml").read_text())
    config["model"] = {"name": "scn", "num_interactions": 1, "lmax": 2, "mmax": 1, "sphere_channels": 8,
                       "sphere_channels_reduce": 8, "hidden_channels": 16, "num_sphere_samples": 16,
                       "num_basis_functions": 8, "cutoff": 5.0}
    path = tmp_path / "scn.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"--resume: the configuration's model is 'scn', the one in .*last\.pt 'schnet'"):
        main(["train", str(path), "--resume", "--set", "optim.max_steps=7"])


def test_scn_eval_and_predict_on_the_schnet_checkpoint(trained_schnet: Path, tiny_reference: Path, tmp_path: Path) -> None:
    best = str(trained_schnet / "checkpoints" / "best.pt")
    s2ef, is2re = tiny_reference / "s2ef" / "test_id.extxyz", tiny_reference / "is2re" / "val_id.extxyz"
    metrics = tmp_path / "metrics.json"
    assert main(["eval", best, str(s2ef), str(is2re), "--max-relax", "1", "--steps", "3", "--quiet", "-o", str(metrics)]) == 0
    splits = json.loads(metrics.read_text())["splits"]
    assert splits["test_id"]["s2ef"]["num_structures"] == len(read(s2ef, ":")) and "adwt" in splits["val_id"]["relax"]["is2rs"]

    out, listing = tmp_path / "p.extxyz", tmp_path / "p.json"
    assert main(["predict", best, str(s2ef), "-o", str(out), "--json", str(listing), "--quiet"]) == 0
    frames, predictions = read(out, ":"), json.loads(listing.read_text())["predictions"]
    model = load_model(best)
    direct = model(AtomicBatch.from_atoms(read(s2ef, ":2")))
    assert len(frames) == len(predictions) == len(read(s2ef, ":"))
    assert predictions[0]["energy"] == pytest.approx(float(direct["energy"][0]), rel=1e-6)
    np.testing.assert_allclose(frames[1].get_forces(apply_constraint=False), direct["forces"][-len(frames[1]):].numpy(), rtol=1e-5, atol=1e-6)


def test_an_unknown_model_name_in_a_config_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: painn}\noptim: {max_steps: 1}\ndataset: {train: x.extxyz}\n")
    with pytest.raises(SystemExit, match=re.escape("model.name must be one of ['scn', 'schnet'")):
        main(["train", str(bad)])
    bad.write_text("model: {name: schnet, lmax: 3}\noptim: {max_steps: 1}\ndataset: {train: x.extxyz}\n")
    with pytest.raises(SystemExit, match=r"model: unknown SchNet options \['lmax'\]"):
        main(["train", str(bad)])
