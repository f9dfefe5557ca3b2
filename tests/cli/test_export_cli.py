"""``scn export``: a checkpoint to a .pt2 artefact that runs without the Python model, and its errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from ase import Atoms
from ase.io import write

from spherical_channels.cli import build_parser, main
from spherical_channels.data.batch import AtomicBatch
from spherical_channels.deployment import load_exported, read_info
from spherical_channels.deployment.export import default_examples
from spherical_channels.models.checkpoint import load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCHNET = FIXTURES / "schnet_tiny" / "ckpt.pt"  # official layout; small: exports in seconds


def test_export_writes_an_artefact_that_matches_the_checkpoint(one_thread, tmp_path: Path, capsys) -> None:  # noqa: ARG001
    out, report = tmp_path / "deploy" / "schnet.pt2", tmp_path / "export.json"
    args = ["export", str(SCHNET), str(out), "--format", "exported-program", "--dtype", "float64", "--json", str(report)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "exported-program, schnet, float64 on cpu, forces: -dE/dx" in printed
    assert "checked on 8 structures" in printed

    record = json.loads(report.read_text())
    assert record["output"] == str(out) and record["bytes"] == out.stat().st_size
    assert record["metadata"]["source"] == str(SCHNET) and record["metadata"]["weights"] == "auto"
    assert record["metadata"]["graph"]["max_num_neighbors"] == 50  # the official SchNet's cap
    assert set(record["seconds"]) == {"trace", "export", "write", "verify"}
    assert record["force_error"] <= 1e-8 and record["energy_error"] <= 1e-8  # float64, same operations
    assert read_info(out).dtype == "float64"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the opt-in's warning
        loaded = load_exported(out, trust_pickle=True)
    model = load_model(SCHNET, dtype=torch.float64)
    batch = AtomicBatch.from_atoms(default_examples()[3:7], dtype=torch.float64)
    got, want = loaded(batch), model(batch)
    assert float((got["energy"] - want["energy"]).abs().max()) <= 1e-5
    assert float((got["forces"] - want["forces"]).abs().max()) <= 1e-5
    assert float(want["forces"].abs().max()) > 0.1


def test_export_errors_are_one_line_and_leave_no_file(tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"
    with pytest.raises(SystemExit, match=r"name it \*\.pt2"):
        main(["export", str(SCHNET), str(tmp_path / "m.pt")])
    with pytest.raises(SystemExit, match="no such file"):
        main(["export", str(tmp_path / "missing.pt"), str(out)])
    with pytest.raises(SystemExit, match="cannot export a spinconv model"):
        main(["export", str(FIXTURES / "spinconv_energy" / "ckpt.pt"), str(out), "--format", "exported-program"])
    with pytest.raises(SystemExit, match="device 'nowhere' is not usable"):
        main(["export", str(SCHNET), str(out), "--device", "nowhere"])
    example = tmp_path / "lone.extxyz"  # an atom without neighbours: no edges to trace with
    write(example, Atoms("Cu", positions=[[5.0, 5.0, 5.0]], cell=[10.0, 10.0, 10.0], pbc=False))
    with pytest.raises(SystemExit, match="too few") as exc:
        main(["export", str(SCHNET), str(out), "--format", "exported-program", "--example", str(example)])
    assert "\n" not in str(exc.value.code) and str(exc.value.code).startswith("scn export: ")
    (tmp_path / "a_directory.pt2").mkdir()
    with pytest.raises(SystemExit, match="is a directory"):
        main(["export", str(SCHNET), str(tmp_path / "a_directory.pt2")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory.pt2", "lone.extxyz"]


def test_export_is_listed_with_its_options(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "export" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for option in ("--format", "--dtype", "--device", "--weights", "--example", "--trust-pickle", "aoti", "exported-program"):
        assert option in text


def test_a_bad_checkpoint_is_one_line_naming_the_file(tmp_path: Path, bad_checkpoint) -> None:
    out = tmp_path / "out.pt2"
    kinds = ("missing", "directory", "empty", "text", "truncated", "bit_flipped", "other_model", "unknown_options",
             "not_a_dict")  # tests/conftest.py BAD_CHECKPOINT_KINDS
    for kind in kinds:
        path = bad_checkpoint(kind)
        with pytest.raises(SystemExit) as exc:
            main(["export", str(path), str(out), "--quiet"])
        message = exc.value.code
        assert isinstance(message, str) and message.startswith("scn export: "), kind
        assert str(path) in message and "\n" not in message, kind
    assert not out.exists()


def test_commands_take_an_artefact_behind_trust_pickle(one_thread, tmp_path: Path, capsys) -> None:  # noqa: ARG001
    """scn predict on an artefact: refused without --trust-pickle (it runs the file's code),
    and with it the checkpoint's predictions."""
    from ase.io import read

    artefact = tmp_path / "schnet.pt2"
    assert main(["export", str(SCHNET), str(artefact), "--format", "exported-program", "--dtype", "float32"]) == 0
    structures = tmp_path / "in.extxyz"
    write(structures, default_examples()[:3])
    with pytest.raises(SystemExit, match="trust_pickle"):
        main(["predict", str(artefact), str(structures), "-o", str(tmp_path / "refused.extxyz")])
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["predict", str(artefact), str(structures), "-o", str(tmp_path / "a.extxyz"), "--trust-pickle", "--quiet"]) == 0
    assert main(["predict", str(SCHNET), str(structures), "-o", str(tmp_path / "c.extxyz"), "--quiet"]) == 0
    for a, c in zip(read(tmp_path / "a.extxyz", ":"), read(tmp_path / "c.extxyz", ":")):
        assert abs(a.get_potential_energy() - c.get_potential_energy()) <= 1e-4
        assert abs(a.get_forces() - c.get_forces()).max() <= 1e-4
