"""Training building blocks: schedule, EMA, loss, configuration, checkpoints, sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models.checkpoint import read_checkpoint, save_checkpoint
from spherical_channels.training.config import ConfigError, OptimConfig, TrainConfig, load_config
from spherical_channels.training.distributed import ShardedSampler
from spherical_channels.training.ema import ExponentialMovingAverage
from spherical_channels.training.losses import energy_force_loss
from spherical_channels.training.schedule import learning_rate


def test_step_schedule_with_warmup() -> None:
    optim = OptimConfig(lr_initial=1.0, warmup_steps=10, warmup_factor=0.2, lr_milestones=[20, 30], lr_gamma=0.3, max_steps=40)
    assert learning_rate(0, optim, 40) == pytest.approx(0.2)
    assert learning_rate(5, optim, 40) == pytest.approx(0.6)  # linear between 0.2 and 1
    assert learning_rate(10, optim, 40) == pytest.approx(1.0)
    assert learning_rate(19, optim, 40) == pytest.approx(1.0)
    assert learning_rate(20, optim, 40) == pytest.approx(0.3)
    assert learning_rate(35, optim, 40) == pytest.approx(0.09)


def test_cosine_schedule_endpoints() -> None:
    optim = OptimConfig(lr_initial=2.0, warmup_steps=0, scheduler="cosine", lr_min_factor=0.1, max_steps=100)
    assert learning_rate(0, optim, 100) == pytest.approx(2.0)
    assert learning_rate(50, optim, 100) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert learning_rate(100, optim, 100) == pytest.approx(0.2)


def test_ema_update_and_swap() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ExponentialMovingAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay warms up: min(0.9, 2/11)
    expected = 1.0 - 2 / 11
    assert ema.shadow["weight"].item() == pytest.approx(expected)
    with ema.applied_to(model):
        assert model.weight.item() == pytest.approx(expected)
    assert model.weight.item() == 1.0
    state = ema.state_dict()
    other = ExponentialMovingAverage(model, decay=0.5)
    other.load_state_dict(state)
    assert other.num_updates == 1 and other.shadow["weight"].item() == pytest.approx(expected)


def _batch(natoms: list[int], seed: int) -> AtomicBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(natoms)
    return AtomicBatch(
        positions=torch.randn(n, 3, generator=g, dtype=torch.float64),
        atomic_numbers=torch.ones(n, dtype=torch.long),
        cell=torch.zeros(len(natoms), 3, 3, dtype=torch.float64),
        pbc=torch.zeros(len(natoms), 3, dtype=torch.bool),
        natoms=torch.tensor(natoms),
        batch=torch.repeat_interleave(torch.arange(len(natoms)), torch.tensor(natoms)),
        fixed=torch.rand(n, generator=g) < 0.3,
        tags=torch.zeros(n, dtype=torch.long),
        energy=torch.randn(len(natoms), generator=g, dtype=torch.float64),
        forces=torch.randn(n, 3, generator=g, dtype=torch.float64),
    )


def test_loss_by_hand() -> None:
    batch = _batch([2, 3], 0)
    batch.fixed = torch.tensor([True, False, False, True, False])
    pred = {"energy": batch.energy + torch.tensor([0.2, -0.3], dtype=torch.float64), "forces": batch.forces.clone()}
    free = ~batch.fixed
    pred["forces"][free] += torch.tensor([0.0, 0.3, 0.4], dtype=torch.float64)  # |error| = 0.5 per free atom
    pred["forces"][batch.fixed] += 7.0  # ignored when training on free atoms
    terms = energy_force_loss(pred, batch, scale=2.0, energy_coefficient=2.0, force_coefficient=100.0)
    assert terms.loss.item() == pytest.approx((2.0 * (0.2 + 0.3) / 2 + 100.0 * 0.5) / 2.0)
    assert terms.energy_mae.item() == pytest.approx(0.25)
    assert terms.energy_mae_per_atom.item() == pytest.approx((0.2 / 2 + 0.3 / 3) / 2)
    assert terms.force_l2mae.item() == pytest.approx(0.5)
    per_atom = energy_force_loss(pred, batch, scale=2.0, energy_coefficient=2.0, force_coefficient=100.0, per_atom_energy=True)
    assert per_atom.loss.item() == pytest.approx((2.0 * (0.2 / 2 + 0.3 / 3) / 2 + 100.0 * 0.5) / 2.0)


def test_distributed_loss_normalisation_sums_to_the_global_loss() -> None:
    """Per-rank losses with global counts, averaged over ranks, equal the global-batch loss
    even when the ranks hold different numbers of atoms (what DDP's averaging needs)."""
    a, b = _batch([2, 5], 1), _batch([3, 1], 2)
    both = AtomicBatch.concatenate([a, b])
    g = torch.Generator().manual_seed(3)
    pred_of = lambda x: {"energy": x.energy + torch.randn(x.num_structures, generator=g, dtype=torch.float64),  # noqa: E731
                         "forces": x.forces + torch.randn(x.num_atoms, 3, generator=g, dtype=torch.float64)}
    pa, pb = pred_of(a), pred_of(b)
    pboth = {k: torch.cat([pa[k], pb[k]]) for k in pa}
    kw = dict(scale=1.3, energy_coefficient=2.0, force_coefficient=100.0)
    structures, atoms = both.num_structures, int((~both.fixed).sum())
    for per_atom in (False, True):
        total = energy_force_loss(pboth, both, **kw, per_atom_energy=per_atom).loss
        per_rank = [
            energy_force_loss(p, x, **kw, global_structures=structures, global_force_atoms=atoms, world_size=2,
                              per_atom_energy=per_atom).loss
            for p, x in ((pa, a), (pb, b))
        ]
        assert ((per_rank[0] + per_rank[1]) / 2).item() == pytest.approx(total.item(), rel=1e-12)


OFFICIAL = """
trainer: forces
logger: wandb
model:
  name: scn
  num_interactions: 12
  hidden_channels: 1024
  sphere_channels: 128
  sphere_channels_reduce: 128
  num_sphere_samples: 128
  num_basis_functions: 128
  distance_function: "gaussian"
  show_timing_info: False
  max_num_neighbors: 40
  cutoff: 8.0
  lmax: 6
  num_bands: 2
  use_grid: True
  regress_forces: True
  use_pbc: True
  basis_width_scalar: 2.0
  otf_graph: True
optim:
  batch_size: 2
  eval_batch_size: 1
  num_workers: 2
  lr_initial: 0.0004
  optimizer: AdamW
  optimizer_params: {"amsgrad": True}
  eval_every: 5000
  lr_gamma: 0.3
  lr_milestones: [260000, 340000, 420000]
  warmup_steps: 100
  warmup_factor: 0.2
  max_epochs: 12
  clip_grad_norm: 100
  ema_decay: 0.999
dataset:
  - src: data/s2ef/train
    normalize_labels: True
    target_mean: -0.7554450631141663
  - src: data/s2ef/val
"""


def test_official_config_sections_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "scn.yml"
    path.write_text(OFFICIAL)
    config = load_config(path)
    assert config.model["lmax"] == 6 and config.model["num_interactions"] == 12
    assert config.optim.lr_milestones == [260000, 340000, 420000] and config.optim.ema_decay == 0.999
    assert config.train.path == str((tmp_path / "data/s2ef/train").resolve())
    assert config.val is not None and config.val.path.endswith("data/s2ef/val")
    assert "trainer:" in config.ignored and "logger:" in config.ignored
    again = TrainConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_config_errors_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("model: {lmax: 4}\noptim: {lr_initial: 4e-4, max_steps: 3}\ndataset: {train: t.xyz}\n")
    config = load_config(path, ["optim.batch_size=16", "run.seed=7"])
    assert config.optim.lr_initial == pytest.approx(4e-4)  # PyYAML reads 4e-4 as a string
    assert config.optim.batch_size == 16 and config.run.seed == 7
    for text, message in [
        ("model: {lmaxx: 4}\noptim: {max_steps: 1}\ndataset: {train: t}", "unknown SCN options"),
        ("model: {}\noptim: {max_steps: 1, lr_intial: 1}\ndataset: {train: t}", "unknown keys"),
        ("model: {}\noptim: {}\ndataset: {train: t}", "max_epochs or max_steps"),
        ("model: {}\noptim: {max_steps: 1}\n", "dataset"),
        ("model: {}\noptim: {max_steps: 1, amp: fp8}\ndataset: {train: t}", "amp"),
        ("model: {}\noptim: {max_steps: x}\ndataset: {train: t}", "expected a number"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, fh):  # noqa: ANN001 - dies halfway through writing
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_sharded_sampler_covers_every_index_and_resumes() -> None:
    samplers = [ShardedSampler(10, rank=r, world_size=3, seed=4) for r in range(3)]
    for s in samplers:
        s.set_epoch(2)
    shards = [list(s) for s in samplers]
    assert all(len(x) == 4 for x in shards)  # padded to 12 = 3 x 4
    assert set(sum(shards, [])) == set(range(10))
    assert list(ShardedSampler(10, 0, 3, seed=4).__iter__()) != shards[0]  # epoch changes the order
    samplers[1].set_epoch(2, start=3)
    assert list(samplers[1]) == shards[1][3:] and len(samplers[1]) == 1
