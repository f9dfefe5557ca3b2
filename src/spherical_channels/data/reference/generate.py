"""Generate the built-in OC20-like reference data set (EMT-labelled adsorbate+slab systems)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import ase
import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.optimize import LBFGS
from tqdm.auto import tqdm

from ..formats.extxyz import ExtxyzWriter
from .adsorbates import ADSORBATES, place_adsorbate
from .catalysts import CATALYSTS, FACETS, TAG_SUBSURFACE, build_slab, catalyst_lattice_constant
from .sanity import BOND_TOLERANCE, DESORPTION_FACTOR, DROP_REASONS, drop_reason

__all__ = [
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "HELD_OUT_ADSORBATES",
    "HELD_OUT_CATALYSTS",
    "IN_DOMAIN_ADSORBATES",
    "IN_DOMAIN_CATALYSTS",
    "RELAX_FMAX",
    "RELAX_MAX_STEPS",
    "SIZES",
    "SPLITS",
    "GenerationReport",
    "SizeConfig",
    "generate_reference_data",
]

GENERATOR_NAME = "spherical_channels.data.reference"
# Bump when the content for a given (size, seed) changes.
GENERATOR_VERSION = "2"  # 2: written with the package's exact-float extxyz writer

SPLITS = ("train", "val_id", "test_id", "test_ood_ads", "test_ood_cat", "test_ood_both")

# Adsorbates EMT keeps in one piece often enough (measured: 1/3 to all of their
# relaxations pass the sanity checks). *H2O, *NH2, *NH3, *CH2, *CH3, *COH and *CHO are
# left out: EMT pulls their H atoms onto the metal in > 90% of relaxations.
IN_DOMAIN_ADSORBATES = (
    "*H", "*O", "*N", "*C", "*OH", "*CH", "*CO", "*NO", "*N2", "*C2", "*OCN", "*NNO", "*CO2",
)  # fmt: skip
HELD_OUT_ADSORBATES = ("*NH", "*CN", "*OCH3")
# Held-out catalysts are new compositions, not new elements: Au and Pd occur in the
# in-domain alloys AuAg and CuPd, Cu3Au's elements in Cu and AuAg, so a model trained
# on the in-domain data has seen every element (and per-element reference energies fit).
IN_DOMAIN_CATALYSTS = ("Al", "Cu", "Ag", "Ni", "Pt", "CuPd", "AuAg", "NiPt")
HELD_OUT_CATALYSTS = ("Au", "Pd", "Cu3Au")

# Relaxation: LBFGS (as few steps as BFGS here, while BFGS's dense Hessian algebra took
# 10-40x longer than the EMT calls themselves) to OC20's force threshold, with a cap.
RELAX_FMAX = 0.05  # eV/A, on free atoms
RELAX_MAX_STEPS = 300
# Rattled frames: Gaussian displacements of the free atoms with a per-frame sigma drawn
# uniformly from this range (Angstrom).
RATTLE_SIGMA = (0.05, 0.15)
# Systems are re-drawn when dropped; a split fails after this many attempts per system.
MAX_ATTEMPTS_PER_SYSTEM = 6
_MIN_ATTEMPTS = 20

FRAME_RELAXATION = "relaxation"
FRAME_RATTLED = "rattled"
FRAME_INITIAL = "initial"

_METADATA = "metadata.json"
_S2EF_DIR = "s2ef"
_IS2RE_DIR = "is2re"
_EXTXYZ = "extxyz"


@dataclass(frozen=True)
class SizeConfig:
    """What one ``size`` generates.

    Attributes:
        systems: kept systems per split (dropped systems are replaced).
        slabs: slab shapes (nx, ny, layers) drawn uniformly per system; (211) slabs
            are one step unit (3 atom rows) wide instead of nx.
        frames_per_trajectory: relaxation frames sampled per system for S2EF.
        rattles_per_system: rattled frames per system for S2EF.
    """

    systems: dict[str, int]
    slabs: tuple[tuple[int, int, int], ...]
    frames_per_trajectory: int
    rattles_per_system: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        out = asdict(self)
        out["slabs"] = [list(s) for s in self.slabs]
        return out


def _per_split(in_domain: tuple[int, int, int], ood: int) -> dict[str, int]:
    train, val, test = in_domain
    return dict(zip(SPLITS, (train, val, test, ood, ood, ood)))


SIZES: dict[str, SizeConfig] = {
    # For tests: 8 systems of 13-23 atoms, a few seconds.
    "tiny": SizeConfig(_per_split((3, 1, 1), 1), ((2, 2, 3),), frames_per_trajectory=3, rattles_per_system=2),
    # For demos: ~1300 training frames of ~20-40 atoms, about a minute or two.
    "small": SizeConfig(
        _per_split((96, 24, 24), 24), ((2, 2, 4), (3, 3, 3), (3, 3, 4)), frames_per_trajectory=8, rattles_per_system=6
    ),
    # ~7000 training frames, several minutes.
    "medium": SizeConfig(
        _per_split((400, 60, 60), 60), ((2, 2, 4), (3, 3, 3), (3, 3, 4)), frames_per_trajectory=10, rattles_per_system=8
    ),
}


# ----------------------------------------------------------------------------- report
@dataclass
class GenerationReport:
    """What :func:`generate_reference_data` wrote.

    Attributes:
        out_dir: the output directory.
        size, seed: the arguments.
        num_systems: kept systems per split.
        num_frames: S2EF frames per split.
        frame_types: S2EF frames per split and frame type ("relaxation", "rattled").
        atoms_per_frame: per split, [min, max] atoms in a frame.
        attempts: systems relaxed in all (kept + dropped).
        dropped: dropped systems per reason (all splits).
        dropped_by_split: dropped systems per split and reason.
        wall_time_s: total wall time (seconds).
        metadata_path: path of metadata.json.
        s2ef_paths, is2re_paths: per split, the written extxyz files.
    """

    out_dir: Path
    size: str
    seed: int
    num_systems: dict[str, int]
    num_frames: dict[str, int]
    frame_types: dict[str, dict[str, int]]
    atoms_per_frame: dict[str, list[int]]
    attempts: int
    dropped: dict[str, int]
    dropped_by_split: dict[str, dict[str, int]]
    wall_time_s: float
    metadata_path: Path
    s2ef_paths: dict[str, Path] = field(default_factory=dict)
    is2re_paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (paths as strings)."""
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["metadata_path"] = str(self.metadata_path)
        out["s2ef_paths"] = {k: str(v) for k, v in self.s2ef_paths.items()}
        out["is2re_paths"] = {k: str(v) for k, v in self.is2re_paths.items()}
        return out

    def summary(self) -> str:
        """A short human-readable table."""
        lines = [
            f"EMT reference data ({self.size}, seed {self.seed}) in {self.out_dir} ({self.wall_time_s:.1f} s)",
            f"{'split':<15}{'systems':>8}{'frames':>8}{'relax':>7}{'rattled':>8}{'atoms':>9}",
        ]
        for split in self.num_systems:
            types = self.frame_types[split]
            lo, hi = self.atoms_per_frame[split]
            lines.append(
                f"{split:<15}{self.num_systems[split]:>8}{self.num_frames[split]:>8}"
                f"{types.get(FRAME_RELAXATION, 0):>7}{types.get(FRAME_RATTLED, 0):>8}{f'{lo}-{hi}':>9}"
            )
        lines.append(_dropped_line(self.dropped, self.attempts))
        return "\n".join(lines)


def _dropped_line(dropped: dict[str, int], attempts: int) -> str:
    total = sum(dropped.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.items())
    return f"dropped {total} of {attempts} relaxed systems ({reasons})"


# ----------------------------------------------------------------------------- systems
@dataclass(frozen=True)
class _SystemSpec:
    system_id: str
    split: str
    adsorbate: str
    catalyst: str
    facet: str
    slab: tuple[int, int, int]


@dataclass
class _Relaxation:
    """EMT relaxation trajectory: positions, energies and (unconstrained) forces per step."""

    positions: list[np.ndarray]
    energies: list[float]
    forces: list[np.ndarray]
    converged: bool

    @property
    def num_steps(self) -> int:
        return len(self.positions) - 1


@dataclass
class _SystemFrames:
    s2ef: list[Atoms]
    is2re: Atoms


def _domains(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adsorbates, catalysts) a split draws from."""
    ads_ood = split in ("test_ood_ads", "test_ood_both")
    cat_ood = split in ("test_ood_cat", "test_ood_both")
    return (
        HELD_OUT_ADSORBATES if ads_ood else IN_DOMAIN_ADSORBATES,
        HELD_OUT_CATALYSTS if cat_ood else IN_DOMAIN_CATALYSTS,
    )


def _pick(options: tuple, rng: np.random.Generator) -> Any:
    return options[rng.integers(len(options))]


def _draw_spec(split: str, attempt: int, config: SizeConfig, rng: np.random.Generator) -> _SystemSpec:
    adsorbates, catalysts = _domains(split)
    return _SystemSpec(
        system_id=f"{split}-{attempt:05d}",
        split=split,
        adsorbate=_pick(adsorbates, rng),
        catalyst=_pick(catalysts, rng),
        facet=_pick(tuple(FACETS), rng),
        slab=_pick(config.slabs, rng),
    )


def _emt_results(atoms: Atoms) -> tuple[float, np.ndarray]:
    """EMT energy and unconstrained forces of ``atoms`` (its calculator is replaced)."""
    atoms.calc = EMT()
    return float(atoms.get_potential_energy()), atoms.get_forces(apply_constraint=False)


def _relax(atoms: Atoms) -> _Relaxation:
    """Relax ``atoms`` in place with EMT, recording every step (step 0 = initial)."""
    atoms.calc = EMT()
    optimizer = LBFGS(atoms, logfile=None)
    record = _Relaxation([], [], [], converged=False)
    for converged in optimizer.irun(fmax=RELAX_FMAX, steps=RELAX_MAX_STEPS):
        record.positions.append(atoms.get_positions())
        record.energies.append(float(atoms.get_potential_energy()))
        record.forces.append(atoms.get_forces(apply_constraint=False))
        record.converged = bool(converged)
    return record


def _labelled(template: Atoms, positions: np.ndarray, energy: float, forces: np.ndarray, info: dict) -> Atoms:
    """Copy of ``template`` at ``positions`` with stored EMT results and extra info."""
    atoms = template.copy()
    atoms.positions = positions
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.array(forces))
    atoms.info.update(info)
    return atoms


def _sample_steps(num_states: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct trajectory steps (all if there are fewer), sorted."""
    if num_states <= count:
        return np.arange(num_states)
    return np.sort(rng.choice(num_states, size=count, replace=False))


def _relaxation_frames(
    initial: Atoms, relaxation: _Relaxation, count: int, info: dict, rng: np.random.Generator
) -> list[Atoms]:
    """``count`` random steps along the relaxation, labelled by the optimizer's EMT calls."""
    frames = []
    for step in _sample_steps(len(relaxation.positions), count, rng):
        step_info = {**info, "frame_type": FRAME_RELAXATION, "relaxation_step": int(step)}
        frames.append(
            _labelled(initial, relaxation.positions[step], relaxation.energies[step], relaxation.forces[step], step_info)
        )
    return frames


def _rattled_frames(
    initial: Atoms, relaxation: _Relaxation, count: int, info: dict, rng: np.random.Generator
) -> list[Atoms]:
    """``count`` random relaxation steps with Gaussian noise on the free atoms, labelled by EMT."""
    free = initial.get_tags() != TAG_SUBSURFACE
    frames = []
    for _ in range(count):
        step = int(rng.integers(len(relaxation.positions)))
        sigma = float(rng.uniform(*RATTLE_SIGMA))
        positions = relaxation.positions[step].copy()
        positions[free] += rng.normal(0.0, sigma, size=(int(free.sum()), 3))
        probe = initial.copy()
        probe.positions = positions
        energy, forces = _emt_results(probe)
        frame_info = {**info, "frame_type": FRAME_RATTLED, "rattled_from_step": step, "rattle_sigma": sigma}
        frames.append(_labelled(initial, positions, energy, forces, frame_info))
    return frames


def _is2re_frame(initial: Atoms, relaxation: _Relaxation, info: dict) -> Atoms:
    """The initial structure (its EMT labels) with the relaxed energy and positions as targets."""
    is2re_info = {
        **info,
        "frame_type": FRAME_INITIAL,
        "relaxed_energy": relaxation.energies[-1],
        "relaxation_steps": relaxation.num_steps,
    }
    frame = _labelled(initial, relaxation.positions[0], relaxation.energies[0], relaxation.forces[0], is2re_info)
    frame.set_array("relaxed_positions", relaxation.positions[-1].copy())
    return frame


def _system_frames(
    spec: _SystemSpec, initial: Atoms, relaxation: _Relaxation, config: SizeConfig, site: str, rng: np.random.Generator
) -> _SystemFrames:
    """S2EF frames (sampled relaxation steps + rattled copies) and the IS2RE frame of a kept system."""
    info = {
        "system_id": spec.system_id,
        "split": spec.split,
        "adsorbate": spec.adsorbate,
        "catalyst": spec.catalyst,
        "facet": spec.facet,
        "site": site,
    }
    s2ef = _relaxation_frames(initial, relaxation, config.frames_per_trajectory, info, rng)
    s2ef += _rattled_frames(initial, relaxation, config.rattles_per_system, info, rng)
    return _SystemFrames(s2ef=s2ef, is2re=_is2re_frame(initial, relaxation, info))


@dataclass
class _Outcome:
    """A relaxed system: its frames if kept, else why it was dropped."""

    frames: _SystemFrames | None
    drop_reason: str | None
    relax_s: float


def _run_system(spec: _SystemSpec, config: SizeConfig, rng: np.random.Generator) -> _Outcome:
    """Build, relax and check one system."""
    slab = build_slab(CATALYSTS[spec.catalyst], spec.facet, spec.slab[:2], spec.slab[2], rng)
    initial, site = place_adsorbate(slab, ADSORBATES[spec.adsorbate], rng)
    relaxed = initial.copy()
    start = time.perf_counter()
    relaxation = _relax(relaxed)
    relax_s = time.perf_counter() - start
    reason = drop_reason(initial, relaxed, relaxation.converged)
    if reason is not None:
        return _Outcome(None, reason, relax_s)
    return _Outcome(_system_frames(spec, initial, relaxation, config, site, rng), None, relax_s)


def _system_rng(seed: int, split: str, attempt: int) -> np.random.Generator:
    """Independent stream per (split, attempt): a system does not depend on the ones before it."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), attempt)))


@dataclass
class _SplitResult:
    s2ef: list[Atoms] = field(default_factory=list)
    is2re: list[Atoms] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    attempts: int = 0
    relax_s: float = 0.0


class _Progress:
    """tqdm bar over kept systems, showing the number dropped so far."""

    def __init__(self, total: int, size: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=f"EMT reference data ({size})", unit="system", disable=not enabled)
        self.num_dropped = 0

    def kept(self) -> None:
        self.bar.update(1)

    def dropped(self) -> None:
        self.num_dropped += 1
        self.bar.set_postfix(dropped=self.num_dropped)

    def close(self) -> None:
        self.bar.close()


def _generate_split(split: str, config: SizeConfig, seed: int, progress: _Progress) -> _SplitResult:
    """Draw systems for ``split`` until ``config.systems[split]`` pass the sanity checks."""
    target = config.systems[split]
    max_attempts = max(_MIN_ATTEMPTS, MAX_ATTEMPTS_PER_SYSTEM * target)
    result = _SplitResult()
    while len(result.is2re) < target:
        if result.attempts >= max_attempts:
            raise RuntimeError(
                f"split {split!r}: only {len(result.is2re)} of {target} systems passed the sanity checks "
                f"after {max_attempts} attempts (dropped: {result.dropped})"
            )
        rng = _system_rng(seed, split, result.attempts)
        spec = _draw_spec(split, result.attempts, config, rng)
        result.attempts += 1
        outcome = _run_system(spec, config, rng)
        result.relax_s += outcome.relax_s
        if outcome.frames is None:
            result.dropped[outcome.drop_reason] += 1
            progress.dropped()
            continue
        result.s2ef.extend(outcome.frames.s2ef)
        result.is2re.append(outcome.frames.is2re)
        progress.kept()
    return result


# ----------------------------------------------------------------------------- output
def _is_previous_output(directory: Path) -> bool:
    """Whether ``directory`` holds a metadata.json written by this generator."""
    try:
        metadata = json.loads((directory / _METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("generator") == GENERATOR_NAME


def _check_out_dir(out_dir: Path) -> None:
    """Refuse a path that is a file, or a non-empty directory this generator did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_previous_output(out_dir):
        raise ValueError(
            f"output directory {out_dir} is not empty and holds no {_METADATA} from {GENERATOR_NAME}; "
            "refusing to write into it (choose a new or empty directory)"
        )


def _write_extxyz(path: Path, frames: list[Atoms]) -> None:
    """Write frames atomically (temporary file, then rename), with the package's writer (exact
    floats, FixAtoms as move_mask, number-like info strings kept as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with ExtxyzWriter(tmp) as writer:
        for frame in frames:
            writer.write(frame)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spherical-channels")
    except PackageNotFoundError:
        return "unknown"


def _split_file(kind_dir: str, split: str) -> str:
    """A split's file, relative to the output directory (as metadata.json records it)."""
    return f"{kind_dir}/{split}.{_EXTXYZ}"


def _split_metadata(split: str, result: _SplitResult) -> dict[str, Any]:
    return {
        "s2ef": _split_file(_S2EF_DIR, split),
        "is2re": _split_file(_IS2RE_DIR, split),
        "num_frames": len(result.s2ef),
        "num_systems": len(result.is2re),
        "frame_types": _count(a.info["frame_type"] for a in result.s2ef),
        "atoms_per_frame": [min(map(len, result.s2ef)), max(map(len, result.s2ef))],
        "adsorbates": sorted({a.info["adsorbate"] for a in result.is2re}),
        "catalysts": sorted({a.info["catalyst"] for a in result.is2re}),
        "facets": sorted({a.info["facet"] for a in result.is2re}),
    }


def _metadata(size: str, seed: int, results: dict[str, _SplitResult], timings: dict[str, float]) -> dict[str, Any]:
    dropped_by_split = {split: r.dropped for split, r in results.items()}
    catalysts = sorted(set(IN_DOMAIN_CATALYSTS) | set(HELD_OUT_CATALYSTS))
    return {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "created_by": f"spherical_channels {_package_version()} generate_reference_data",
        "seed": seed,
        "size": size,
        "size_config": SIZES[size].to_dict(),
        "calculator": {"name": "EMT", "module": "ase.calculators.emt", "ase_version": ase.__version__},
        "units": {"energy": "eV", "forces": "eV/Å", "length": "Å"},
        "energy": "EMT total energy",
        "forces": "EMT forces on all atoms; fixed atoms keep their EMT forces (not zeroed)",
        "tags": {"0": "sub-surface slab atom (fixed)", "1": "surface slab atom (free)", "2": "adsorbate atom"},
        "constraints": "FixAtoms on exactly the tag-0 atoms (extxyz move_mask column)",
        "relaxation": {"optimizer": "LBFGS", "fmax": RELAX_FMAX, "max_steps": RELAX_MAX_STEPS},
        "rattle": {"sigma_range": list(RATTLE_SIGMA), "displaced": "free atoms (tags 1 and 2)"},
        "sanity_checks": {
            "bond_tolerance": BOND_TOLERANCE,
            "desorption_factor": DESORPTION_FACTOR,
            "not_converged": f"relaxation did not reach fmax {RELAX_FMAX} eV/Å within {RELAX_MAX_STEPS} steps",
            "desorbed": f"no adsorbate-slab pair closer than {DESORPTION_FACTOR} x covalent radii sum",
            "broken": f"adsorbate bond graph (bond: < {1 + BOND_TOLERANCE} x covalent radii sum) "
            "disconnected or different from the initial one",
        },
        "lattice_constants": {c: round(catalyst_lattice_constant(CATALYSTS[c]), 6) for c in catalysts},
        "splits": {split: _split_metadata(split, r) for split, r in results.items()},
        "in_domain": {"adsorbates": list(IN_DOMAIN_ADSORBATES), "catalysts": list(IN_DOMAIN_CATALYSTS)},
        "held_out": {"adsorbates": list(HELD_OUT_ADSORBATES), "catalysts": list(HELD_OUT_CATALYSTS)},
        "attempts": sum(r.attempts for r in results.values()),
        "dropped": {reason: sum(d[reason] for d in dropped_by_split.values()) for reason in DROP_REASONS},
        "dropped_by_split": dropped_by_split,
        "timings": timings,
    }


# ----------------------------------------------------------------------------- entry point
def generate_reference_data(
    out_dir: str | Path, size: str = "small", seed: int = 0, progress: bool = True
) -> GenerationReport:
    """Generate the OC20-like EMT reference data set into ``out_dir``.

    Writes ``metadata.json``, ``s2ef/<split>.extxyz`` (sampled relaxation frames and
    rattled frames) and ``is2re/<split>.extxyz`` (initial structures with
    ``info["relaxed_energy"]`` and the ``relaxed_positions`` array) for every split in
    :data:`SPLITS`. The same ``size`` and ``seed`` give identical extxyz files (and
    metadata except ``timings``).

    Args:
        out_dir: output directory; created if missing. It must be empty or a previous
            output of this generator (whose files are then overwritten; other files
            in it are left alone).
        size: a key of :data:`SIZES` (``"tiny"``, ``"small"``, ``"medium"``).
        seed: non-negative integer seed.
        progress: show a progress bar over systems (the dropped counts end the report's
            :meth:`GenerationReport.summary`).

    Raises:
        ValueError: unknown size, negative seed, or an unusable ``out_dir``.
        RuntimeError: a split cannot be filled (too many systems dropped).
    """
    start = time.perf_counter()
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    config = SIZES[size]

    results: dict[str, _SplitResult] = {}
    bar = _Progress(sum(config.systems.values()), size, enabled=progress)
    try:
        for split in SPLITS:
            results[split] = _generate_split(split, config, seed, bar)
    finally:
        bar.close()
    generated = time.perf_counter()

    out_dir.mkdir(parents=True, exist_ok=True)
    s2ef_paths, is2re_paths = {}, {}
    for split, result in results.items():
        s2ef_paths[split] = out_dir / _split_file(_S2EF_DIR, split)
        is2re_paths[split] = out_dir / _split_file(_IS2RE_DIR, split)
        _write_extxyz(s2ef_paths[split], result.s2ef)
        _write_extxyz(is2re_paths[split], result.is2re)
    written = time.perf_counter()
    relax_s = sum(r.relax_s for r in results.values())
    timings = {
        "relaxation_s": round(relax_s, 3),
        "labelling_and_checks_s": round(generated - start - relax_s, 3),
        "writing_s": round(written - generated, 3),
        "total_s": round(written - start, 3),
    }
    metadata = _metadata(size, seed, results, timings)
    _write_json(out_dir / _METADATA, metadata)

    report = GenerationReport(
        out_dir=out_dir,
        size=size,
        seed=seed,
        num_systems={s: len(r.is2re) for s, r in results.items()},
        num_frames={s: len(r.s2ef) for s, r in results.items()},
        frame_types={s: m["frame_types"] for s, m in metadata["splits"].items()},
        atoms_per_frame={s: m["atoms_per_frame"] for s, m in metadata["splits"].items()},
        attempts=metadata["attempts"],
        dropped=metadata["dropped"],
        dropped_by_split=metadata["dropped_by_split"],
        wall_time_s=time.perf_counter() - start,
        metadata_path=out_dir / _METADATA,
        s2ef_paths=s2ef_paths,
        is2re_paths=is2re_paths,
    )
    return report
