"""`scn train | eval | predict | relax | demo`, end to end on tiny EMT data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.io import read

from spherical_channels.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_MODEL = dict(num_interactions=2, lmax=2, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
                  num_sphere_samples=16, num_basis_functions=8, cutoff=5.0, max_num_neighbors=16)


@pytest.fixture(scope="module")
def trained(tiny_reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`scn train` on the tiny data: the run directory."""
    out = tmp_path_factory.mktemp("cli") / "run"
    config = out.parent / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "scn", **TINY_MODEL},
        "optim": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1},
        "dataset": {"train": str(tiny_reference / "s2ef" / "train.extxyz"), "val": str(tiny_reference / "s2ef" / "val_id.extxyz")},
        "run": {"output_dir": str(out), "progress": False, "plots": False},
    }))
    assert main(["train", str(config), "--set", "optim.max_steps=6"]) == 0
    with pytest.raises(SystemExit, match="--resume"):  # an existing run is not overwritten
        main(["train", str(config)])
    assert main(["train", str(config), "--resume", "--set", "optim.max_steps=8"]) == 0
    return out


def test_train_writes_a_resumable_run(trained: Path) -> None:
    import torch

    last = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer_state"]["step"] == 8
    assert (trained / "checkpoints" / "best.pt").exists()


def test_train_reports_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such configuration file"):
        main(["train", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {lmaxx: 3}\noptim: {max_steps: 1}\ndataset: {train: x.extxyz}\n")
    with pytest.raises(SystemExit, match="unknown SCN options"):
        main(["train", str(bad)])


def test_eval_every_split_with_baseline_and_relaxations(trained: Path, tiny_reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "metrics.json"
    best = str(trained / "checkpoints" / "best.pt")
    assert main(["eval", best, str(tiny_reference), "--baseline", "--max-relax", "1", "--steps", "20", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "test_ood_both" in table and "baseline" in table and "EFwT" in table
    splits = json.loads(out.read_text())["splits"]
    assert set(splits) == {"train", "val_id", "test_id", "test_ood_ads", "test_ood_cat", "test_ood_both"}
    for row in splits.values():
        assert -1 <= row["s2ef"]["force_cos"] <= 1
        assert row["s2ef"]["num_structures"] > 0 and "force_mae" in row["baseline"]
        assert 0 <= row["relax"]["is2rs"]["adwt"] <= 1 and 0 <= row["relax"]["is2rs"]["afbt"] <= 1  # EMT data: AFbT
        assert "ewt" in row["relax"]["is2re"]


def test_eval_files_given_directly(trained: Path, tiny_reference: Path, tmp_path: Path) -> None:
    """Files, not a generated directory: the task is told from the first structure (relaxed
    targets: relaxations, else S2EF) and each file is one row named after it."""
    out = tmp_path / "metrics.json"
    best = str(trained / "checkpoints" / "best.pt")
    s2ef, is2re = tiny_reference / "s2ef" / "test_id.extxyz", tiny_reference / "is2re" / "val_id.extxyz"
    assert main(["eval", best, str(s2ef), str(is2re), "--max-relax", "1", "--steps", "5", "--quiet", "-o", str(out)]) == 0
    splits = json.loads(out.read_text())["splits"]
    assert set(splits) == {"test_id", "val_id"}
    assert set(splits["test_id"]) == {"s2ef"} and splits["test_id"]["s2ef"]["num_structures"] == len(read(s2ef, ":"))
    assert set(splits["val_id"]) == {"relax"} and "adwt" in splits["val_id"]["relax"]["is2rs"]


def test_predict_and_relax(trained: Path, tiny_reference: Path, tmp_path: Path) -> None:
    best = str(trained / "checkpoints" / "best.pt")
    source = tiny_reference / "s2ef" / "test_id.extxyz"
    assert main(["predict", best, str(source), "-o", str(tmp_path / "p.extxyz"), "--json", str(tmp_path / "p.json"), "--quiet"]) == 0
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    frames = read(tmp_path / "p.extxyz", ":")
    assert len(predictions) == len(frames) == len(read(source, ":"))
    assert frames[0].get_potential_energy() == pytest.approx(predictions[0]["energy"])

    initial = tiny_reference / "is2re" / "test_id.extxyz"
    out = tmp_path / "relaxed.extxyz"
    assert main(["relax", best, str(initial), "-o", str(out), "--steps", "5", "--trajectory-dir", str(tmp_path / "t"), "--quiet"]) == 0
    before, after = read(initial, ":"), read(out, ":")
    assert len(after) == len(before) and list((tmp_path / "t").glob("*.traj"))
    fixed = before[0].constraints[0].get_indices()
    np.testing.assert_array_equal(after[0].positions[fixed], before[0].positions[fixed])
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary[0]["steps"] <= 5
    with pytest.raises(SystemExit, match="no such"):
        main(["relax", best, str(tmp_path / "missing.extxyz")])


def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--size", "tiny", "--train-minutes", "0.1", "--relax", "1", "--quiet"]
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "SCN demo report" in report and "baseline" in report and "total" in report
    results = json.loads((out / "report.json").read_text())["results"]
    assert set(results) == {"test_id", "test_ood_ads", "test_ood_cat", "test_ood_both"}
    assert all({"s2ef", "baseline", "relax"} <= set(r) for r in results.values())
    assert (out / "run" / "checkpoints" / "best.pt").exists() and (out / "report.txt").exists()
    with pytest.raises(SystemExit, match="already holds"):  # never overwritten
        main(args)


def test_demo_config_matches_the_shipped_yaml() -> None:
    from spherical_channels.cli.demo import demo_config
    from spherical_channels.training import TrainConfig, load_config

    shipped = load_config(CONFIGS / "small" / "scn_demo.yaml")
    built = TrainConfig.from_dict(demo_config(Path("data"), Path("run"), 10.0, 0))
    assert shipped.model == built.model
    assert shipped.optim == built.optim
