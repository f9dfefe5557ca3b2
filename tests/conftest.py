"""Shared fixtures: the built-in reference data at its smallest size, generated once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``scn data generate --size tiny`` output (a few seconds; EMT-labelled, OC20 splits)."""
    from spherical_channels.data.reference import generate_reference_data

    out = tmp_path_factory.mktemp("reference") / "tiny"
    generate_reference_data(out, size="tiny", seed=0, progress=False)
    return out


#: Every kind of file that ``bad_checkpoint`` makes ("missing" is a path never created).
BAD_CHECKPOINT_KINDS = (
    "missing", "directory", "empty", "text", "truncated", "bit_flipped", "other_model", "unknown_options", "not_a_dict",
)


def _write_bad_checkpoint(kind: str, folder: Path) -> Path:
    source = Path(__file__).resolve().parent / "fixtures" / "cfg_tiny" / "ckpt.pt"
    path = folder / f"{kind}.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("model: scn\nlmax: 6\n")
    elif kind == "truncated":
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif kind == "bit_flipped":
        data = bytearray(source.read_bytes())
        for offset in range(200, len(data), 997):
            data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "other_model":  # the official layout, for another model class
        checkpoint = torch.load(source, weights_only=True)
        checkpoint["config"]["model"] = "gemnet_oc"
        torch.save(checkpoint, path)
    elif kind == "unknown_options":  # this package's format, with a configuration it does not know
        torch.save({"format": "spherical_channels/checkpoint-v1", "model_config": {"lmaxx": 3}, "state_dict": {}}, path)
    elif kind == "not_a_dict":
        torch.save([1, 2, 3], path)
    elif kind != "missing":
        raise ValueError(f"unknown kind of bad checkpoint {kind!r}")
    return path


@pytest.fixture
def bad_checkpoint(tmp_path: Path):
    """``bad_checkpoint(kind) -> path``: a file in ``tmp_path`` that is not a usable SCN
    checkpoint, of one of :data:`BAD_CHECKPOINT_KINDS`."""
    return lambda kind: _write_bad_checkpoint(kind, tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module of tiny models: on a shared 2-core machine a second thread only
    contends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
