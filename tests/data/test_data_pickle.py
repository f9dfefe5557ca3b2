"""Legacy OC20 LMDBs hold pickles: nothing is unpickled without the explicit opt-in
(trust_pickle=True, --trust-pickle), whatever the entry point."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import lmdb
import numpy as np
import pytest
import yaml
import torch
from ase import Atoms

from spherical_channels.cli import main
from spherical_channels.cli.common import data_items, open_structures
from spherical_channels.data import DataError, open_dataset
from spherical_channels.data.formats.oc20lmdb import Oc20LmdbReader, UntrustedPickleWarning, pickle_globals


class _RunsCode:
    """Unpickles by running code: creates ``marker``, then returns ``value`` (itself unpickled
    from bytes, so that a trusted read still gets real data)."""

    def __init__(self, marker: Path, value: object):
        self.marker = marker
        self.payload = pickle.dumps(value, protocol=-1)

    def __reduce__(self):
        code = f"__import__('pathlib').Path({str(self.marker)!r}).touch() or __import__('pickle').loads({self.payload!r})"
        return eval, (code,)


def _data(k: int):
    from torch_geometric.data import Data

    pos = np.array([[0.0, 0.0, 0.0], [1.8, 1.8, 0.0], [0.9, 0.9, 1.8]]) + 0.01 * k
    return Data(
        pos=torch.tensor(pos, dtype=torch.float32),
        atomic_numbers=torch.tensor([29.0, 29.0, 8.0]),
        cell=(torch.eye(3) * 3.6).view(1, 3, 3),
        natoms=3,
        y=-10.0 - k,
        force=torch.zeros(3, 3),
        sid=k,
    )


def evil_lmdb(path: Path, marker: Path, count: int = 3, subdir: bool = False) -> Path:
    """An OC20-style LMDB whose every entry (and ``length``) creates ``marker`` when unpickled."""
    env = lmdb.open(str(path), subdir=subdir, map_size=1 << 24, meminit=False)
    with env.begin(write=True) as txn:
        for k in range(count):
            txn.put(f"{k}".encode(), pickle.dumps(_RunsCode(marker, _data(k)), protocol=-1))
        txn.put(b"length", pickle.dumps(_RunsCode(marker, count), protocol=-1))
    env.close()
    return path


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    return evil_lmdb(tmp_path / "evil.lmdb", marker), marker


def _assert_refused(err: BaseException, path: Path) -> None:
    message = str(err)
    assert message.startswith(f"{path}: a legacy OC20 LMDB (3 entries; the first is a pickle that would import builtins.eval)")
    for part in ("trust_pickle=True", "--trust-pickle", ".aselmdb", "scn data convert --trust-pickle"):
        assert part in message, part


def test_the_fixture_runs_code_when_unpickled(evil: tuple[Path, Path]) -> None:
    """The check below is meaningful: a plain read of an entry does create the marker."""
    path, marker = evil
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        data = pickle.loads(txn.get(b"1"))
    env.close()
    assert marker.exists() and float(data.y) == -11.0


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def test_open_dataset_refuses_without_opt_in(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    before = _snapshot(path.parent)
    for call in (
        lambda: open_dataset(path),
        lambda: open_dataset(path, format="oc20-lmdb"),
        lambda: open_dataset(path.parent),  # the directory of shards
        lambda: Oc20LmdbReader(path),
    ):
        with pytest.raises(DataError) as info:
            call()
        _assert_refused(info.value, path)
        assert not marker.exists()
    assert _snapshot(path.parent) == before  # inspecting the file wrote nothing


def test_cli_helpers_refuse_without_opt_in(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    with pytest.raises(DataError) as info:
        open_structures(path)
    _assert_refused(info.value, path)
    with pytest.raises(DataError):
        data_items([str(path)])
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv",
    [["data", "check", "{path}"], ["data", "stats", "{path}"], ["data", "convert", "{path}", "{out}"]],
    ids=["check", "stats", "convert"],
)
def test_data_commands_refuse_without_opt_in(evil: tuple[Path, Path], argv: list[str]) -> None:
    path, marker = evil
    out = path.with_name("out.aselmdb")
    with pytest.raises(SystemExit) as info:
        main([a.format(path=path, out=out) for a in argv] + ["--quiet"])
    assert str(info.value.code).startswith(f"scn data {argv[1]}: {path}: a legacy OC20 LMDB")
    assert "--trust-pickle" in str(info.value.code)
    assert not marker.exists() and not out.exists()


def test_with_the_opt_in_it_warns_and_reads(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = evil_lmdb(tmp_path / "trusted.lmdb", marker)
    with pytest.warns(UntrustedPickleWarning, match="only open files you trust"):
        ds = open_dataset(path, trust_pickle=True)
    assert marker.exists()  # the opt-in really lets the file run code
    assert len(ds) == 3 and [a.calc.results["energy"] for a in ds] == [-10.0, -11.0, -12.0]


def test_cli_with_trust_pickle_warns_and_converts(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = evil_lmdb(tmp_path / "cli.lmdb", marker)
    out = tmp_path / "cli.aselmdb"
    with pytest.warns(UntrustedPickleWarning):
        assert main(["data", "convert", str(path), str(out), "--trust-pickle", "--quiet"]) == 0
    assert marker.exists()
    marker.unlink()
    # the converted file holds no code: it opens without the opt-in and runs nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrustedPickleWarning)
        assert [a.info["sid"] for a in open_dataset(out)] == [0, 1, 2]
        assert main(["data", "check", str(out), "--quiet"]) == 0
    assert not marker.exists()


def test_directory_with_data_mdb_needs_a_name_or_a_format(tmp_path: Path) -> None:
    """A directory holding data.mdb is not taken for an OC20 LMDB just for that."""
    marker = tmp_path / "code_ran"
    env_dir = evil_lmdb(tmp_path / "env", marker, subdir=True)
    assert (env_dir / "data.mdb").is_file()
    with pytest.raises(DataError, match=r"env: directory holds an LMDB environment \(data\.mdb\).*format='oc20-lmdb'"):
        open_dataset(env_dir)
    with pytest.raises(DataError, match="a legacy OC20 LMDB .*trust_pickle=True"):
        open_dataset(env_dir, format="oc20-lmdb")
    assert not marker.exists()
    with pytest.warns(UntrustedPickleWarning):
        assert len(open_dataset(env_dir, format="oc20-lmdb", trust_pickle=True)) == 3
    named = evil_lmdb(tmp_path / "named.lmdb", marker, subdir=True)  # a directory named *.lmdb
    marker.unlink()
    with pytest.raises(DataError, match="a legacy OC20 LMDB"):
        open_dataset(named)
    assert not marker.exists()


def test_pickle_globals_reads_opcodes_only(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    raw = pickle.dumps(_RunsCode(marker, 1), protocol=-1)
    assert pickle_globals(raw) == ["builtins.eval"] and not marker.exists()
    names = pickle_globals(pickle.dumps(_data(0), protocol=-1))
    assert names[0] == "torch_geometric.data.data.Data"
    assert pickle_globals(pickle.dumps(_RunsCode(marker, 1), protocol=0)) == ["builtins.eval"]
    assert pickle_globals(b"not a pickle") == []
    atoms = Atoms("H")
    assert "ase.atoms.Atoms" in pickle_globals(pickle.dumps(atoms, protocol=2))


def _train_config(tmp_path: Path, data: Path) -> Path:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"num_interactions": 1, "lmax": 1, "mmax": 1, "sphere_channels": 4, "sphere_channels_reduce": 4,
                  "hidden_channels": 8, "num_sphere_samples": 8, "num_basis_functions": 4, "cutoff": 4.0,
                  "max_num_neighbors": 8},
        "optim": {"batch_size": 3, "max_steps": 1, "warmup_steps": 0},
        "dataset": {"train": str(data)},
        "run": {"output_dir": str(tmp_path / "run"), "progress": False, "plots": False},
    }))
    return config


def test_scn_train_refuses_a_legacy_lmdb_without_opt_in_and_trains_with_it(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "code_ran"
    path = evil_lmdb(tmp_path / "train.lmdb", marker)
    config = _train_config(tmp_path, path)
    with pytest.raises(SystemExit) as info:
        main(["train", str(config)])
    message = str(info.value.code)
    assert message.startswith(f"scn train: {path}: a legacy OC20 LMDB") and "--trust-pickle" in message
    assert not marker.exists()
    with pytest.warns(UntrustedPickleWarning):
        assert main(["train", str(config), "--trust-pickle"]) == 0
    assert marker.exists() and (tmp_path / "run" / "checkpoints" / "last.pt").exists()
