"""Checkpoints you can trust: one reader, no code from a file without the opt-in, clear errors."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

from spherical_channels import SCNCalculator
from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models import SCN
from spherical_channels.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_model,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from spherical_channels.resources import EXAMPLE_CHECKPOINT, EXAMPLE_STRUCTURES, resource_path
from spherical_channels.security import UntrustedPickleWarning

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
OLD_NATIVE = HERE / "data" / "native_v0_1_0.pt"  # written by the package before SCNConfig existed


class _WritesMarker:
    """Unpickling this object opens (creates) a file: a stand-in for code run from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _malicious_official_checkpoint(directory: Path) -> tuple[Path, Path]:
    """An official-layout checkpoint (valid weights) that also pickles :class:`_WritesMarker`."""
    marker = directory / "marker"
    checkpoint = read_checkpoint(FIXTURES / "cfg_tiny" / "ckpt.pt")
    checkpoint["extra"] = _WritesMarker(marker)
    path = directory / "official.pt"
    torch.save(checkpoint, path)
    return path, marker


def test_pickled_code_never_runs_without_the_opt_in(tmp_path: Path) -> None:
    path, marker = _malicious_official_checkpoint(tmp_path)
    for attempt in (
        lambda: read_checkpoint(path),
        lambda: load_model(path),
        lambda: SCN.from_fairchem(str(path)),
        lambda: SCNCalculator(path),
    ):
        with pytest.raises(CheckpointError, match="trust_pickle=True") as info:
            attempt()
        assert str(path) in str(info.value) and "open" in str(info.value)  # what it would run
        assert not marker.exists()
    with pytest.warns(UntrustedPickleWarning, match="runs code"):
        model = load_model(path, trust_pickle=True)
    assert marker.exists()  # the opt-in did unpickle, so the test's marker works
    assert isinstance(model, SCN)


@pytest.mark.parametrize("command", ["predict", "eval", "relax"])
def test_no_command_runs_pickled_code_without_the_opt_in(tmp_path: Path, command: str) -> None:
    from spherical_channels.cli import main

    path, marker = _malicious_official_checkpoint(tmp_path)
    structures = tmp_path / "structures.extxyz"
    shutil.copy(resource_path(EXAMPLE_STRUCTURES), structures)
    extra = {"predict": [], "eval": [], "relax": ["--steps", "1"]}[command]
    output = ["-o", str(tmp_path / "out.extxyz")] if command != "eval" else []
    with pytest.raises(SystemExit) as info:
        main([command, str(path), str(structures), *output, *extra])
    assert "--trust-pickle" in str(info.value.code)
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main([command, str(path), str(structures), *output, *extra, "--trust-pickle"])
        except SystemExit as err:  # the command may still refuse the data; the file was read
            assert "--trust-pickle" not in str(err.code)
    assert marker.exists()


def test_package_and_official_checkpoints_load_without_the_opt_in(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrustedPickleWarning)
        assert isinstance(load_model(resource_path(EXAMPLE_CHECKPOINT)), SCN)
        for name in ("cfg_tiny", "cfg_t1b1", "cfg_m0"):
            assert isinstance(load_model(FIXTURES / name / "ckpt.pt"), SCN)
        assert isinstance(load_model(OLD_NATIVE), SCN)


def test_a_checkpoint_written_before_the_config_object_gives_the_same_predictions() -> None:
    model = load_model(OLD_NATIVE)
    assert model.config.lmax == 3 and model.config.neighbor_ties == "official"
    frames = read(resource_path(EXAMPLE_STRUCTURES), ":3")
    out = model(AtomicBatch.from_atoms(frames))
    expected = np.load(HERE / "data" / "native_v0_1_0_preds.npz")
    np.testing.assert_allclose(out["energy"].detach().numpy(), expected["energy"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out["forces"].detach().numpy(), expected["forces"], rtol=1e-6, atol=1e-5)


def test_a_saved_model_records_its_current_config(tmp_path: Path) -> None:
    model = load_model(OLD_NATIVE)
    model.update_config(eval_roll="random")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "ema_state_dict": None,
    }
    save_checkpoint(checkpoint, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    assert again.config == model.config and again.eval_roll == "random"


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "truncated", "bit_flipped", "not_a_dict"])
def test_bad_files_give_an_error_naming_the_file(kind: str, bad_checkpoint) -> None:
    path = bad_checkpoint(kind)
    expected = FileNotFoundError if kind == "missing" else CheckpointError
    with pytest.raises(expected) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, (FileNotFoundError, ValueError))


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = read_checkpoint(FIXTURES / "cfg_tiny" / "ckpt.pt")
    checkpoint["config"]["model"] = "gemnet_oc"
    torch.save(checkpoint, tmp_path / "gemnet.pt")
    with pytest.raises(CheckpointError, match=r"gemnet\.pt: .*model 'gemnet_oc', which this package does not implement"):
        load_model(tmp_path / "gemnet.pt")
    # SchNet is implemented: an SCN checkpoint labelled "schnet" is refused for its options
    checkpoint["config"]["model"] = "schnet"
    torch.save(checkpoint, tmp_path / "schnet.pt")
    with pytest.raises(CheckpointError, match=r"schnet\.pt: unknown SchNet options \['basis_width_scalar'"):
        load_model(tmp_path / "schnet.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither this package's checkpoint format nor the official"):
        load_model(tmp_path / "other.pt")


def test_weights_that_do_not_fit_their_config_are_named(tmp_path: Path) -> None:
    checkpoint = read_checkpoint(OLD_NATIVE)
    checkpoint["model_config"]["sphere_channels"] = 12
    save_checkpoint(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: weights do not fit .*sphere_embedding\.weight"):
        load_model(tmp_path / "bad.pt")


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path: Path) -> None:
    save_checkpoint({"format": CHECKPOINT_FORMAT}, tmp_path / "last.pt")
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and (tmp_path / "last.pt").exists()
