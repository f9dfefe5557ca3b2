"""The CUDA code paths, against the CPU: they run where CUDA exists and are skipped elsewhere.

``SCN_TEST_ACCELERATOR=cpu`` runs them on the CPU instead (to check the tests themselves on a
machine without a GPU); by default they use ``cuda``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc111

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models import SCN
from spherical_channels.simulation import SCNCalculator, relax_many
from spherical_channels.simulation.md import md_many
from spherical_channels.testing.potentials import MorsePotential

from scn_helpers import batch_from_preds

DEVICE = os.environ.get("SCN_TEST_ACCELERATOR", "cuda")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA"
)


def slabs(count: int = 4) -> list:
    out = []
    for k in range(count):
        atoms = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
        add_adsorbate(atoms, "O", 1.3 + 0.2 * k, "fcc")
        atoms.rattle(0.05, seed=k)
        out.append(atoms)
    return out


@pytest.mark.parametrize("cfg", ["cfg_tiny", "cfg_t1b1"])
def test_official_fixtures_on_the_device(cfg: str) -> None:
    """The official float32 outputs, within the fixtures' stated float32 tolerance."""
    preds = np.load(FIXTURES / cfg / "preds.npz")
    model = SCN.from_fairchem(FIXTURES / cfg / "ckpt.pt").to(DEVICE).eval()
    out = model(batch_from_preds(preds).to(device=DEVICE))
    energy = out["energy"].detach().cpu().double().numpy()
    forces = out["forces"].detach().cpu().double().numpy()
    assert np.all(np.abs(energy - preds["energy"]) <= 1e-4 + 1e-5 * np.abs(preds["energy"]))
    assert np.abs(forces - preds["forces"]).max() <= 1e-4


def test_batched_relaxation_with_memory_sizing_matches_the_cpu() -> None:
    """No max_atoms on CUDA: the batch is sized from the first call's peak memory."""
    settings = dict(optimizer="LBFGS", fmax=0.05, steps=60, dtype=torch.float64, progress=False)
    cpu = relax_many(slabs(), MorsePotential(), device="cpu", max_atoms=1000, **settings)
    dev = relax_many(slabs(), MorsePotential(), device=DEVICE, **settings)
    for a, b in zip(cpu, dev):
        assert (a.steps, a.converged, a.error) == (b.steps, b.converged, b.error)
        np.testing.assert_allclose(b.atoms.positions, a.atoms.positions, rtol=0, atol=1e-8)
        assert b.energy == pytest.approx(a.energy, abs=1e-8)


def test_batched_md_matches_the_cpu(tmp_path: Path) -> None:
    settings = dict(ensemble="nvt", timestep_fs=1.0, steps=40, temperature_K=300.0, seed=3, progress=False)
    cpu = md_many(slabs(2), MorsePotential().double(), **settings)
    dev = md_many(slabs(2), MorsePotential().double().to(DEVICE), **settings)
    for a, b in zip(cpu, dev):
        np.testing.assert_allclose(b.atoms.positions, a.atoms.positions, rtol=0, atol=1e-8)


def test_calculator_on_the_device_matches_the_cpu() -> None:
    torch.manual_seed(0)
    model = SCN(num_interactions=2, lmax=3, mmax=1, sphere_channels=8, sphere_channels_reduce=8,
                hidden_channels=16, num_sphere_samples=32, num_basis_functions=16, cutoff=5.0,
                max_num_neighbors=12, direct_forces=False)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=2)
    results = {}
    for device in ("cpu", DEVICE):
        atoms.calc = SCNCalculator(model, device=device, dtype=torch.float64)
        results[device] = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
    for got, want in zip(results[DEVICE], results["cpu"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("amp", ["none", "bf16"] + (["fp16"] if DEVICE.startswith("cuda") else []))
def test_a_training_step_on_the_device(amp: str) -> None:
    """Forward, force loss, backward and an AdamW step under each autocast mode: finite, and
    the loss goes down over a few steps on one batch."""
    torch.manual_seed(0)
    model = SCN(num_interactions=2, lmax=3, mmax=1, sphere_channels=8, sphere_channels_reduce=8,
                hidden_channels=16, num_sphere_samples=32, num_basis_functions=16, cutoff=5.0,
                max_num_neighbors=12).to(DEVICE).train()
    batch = AtomicBatch.from_atoms(slabs(), dtype=torch.float32, device=DEVICE)
    target = torch.randn(batch.num_atoms, 3, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(DEVICE.split(":")[0], enabled=amp == "fp16")
    losses = []
    for _ in range(6):
        opt.zero_grad()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        with torch.autocast(DEVICE.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(batch)
        loss = (out["forces"].float() - target).norm(dim=-1).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
