"""Training configuration: YAML with ``model:``, ``optim:``, ``dataset:`` and ``run:`` sections.

``model.name`` picks the model (``scn``, ``schnet``: any name of
:mod:`spherical_channels.models.registry`; default ``scn``). The ``model:`` and ``optim:``
sections of the official configs (fairchem/OCP) are accepted as they are (``model.name`` plus
the constructor arguments; ``optim.lr_initial``, ``lr_milestones``, ``warmup_steps``, ...).
Keys the official trainer uses but that have no meaning here (``trainer:``, ``logger:``,
``includes:`` ...) are reported and ignored; a key that is misspelled is an error, not
silently ignored.

Example (the paper's recipe on the built-in data)::

    model:
      name: scn
      num_interactions: 4
      lmax: 6
      sphere_channels: 32
    optim:
      batch_size: 8
      lr_initial: 4.0e-4
      max_epochs: 20
    dataset:
      train: {path: data/s2ef/train.extxyz}
      val: {path: data/s2ef/val_id.extxyz}
    run:
      output_dir: runs/demo
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "DataSource", "OptimConfig", "RunConfig", "TrainConfig", "load_config"]

# Top-level sections of official configs that this trainer does not use.
_IGNORED_SECTIONS = ("trainer", "logger", "task", "outputs", "loss_functions", "evaluation_metrics", "slurm", "hide_eval_progressbar")
# Official optim keys with no meaning here (data loading and logging work differently).
_IGNORED_OPTIM_KEYS = ("eval_batch_size_per_gpu", "load_balancing", "print_every", "loss_energy", "loss_force", "force_coefficient_decay")


class ConfigError(ValueError):
    """A training configuration that cannot be used as written."""


@dataclass
class DataSource:
    """One data set: a file (or directory) any reader of :mod:`spherical_channels.data` opens.

    ``energy_key`` / ``forces_key`` read targets from named info / array entries instead of
    the stored calculator results (as MACE allows).
    """

    path: str
    format: str | None = None
    energy_key: str | None = None
    forces_key: str | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> "DataSource":
        if isinstance(value, (str, Path)):
            return cls(path=str(value))
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a path or a mapping with 'path', got {value!r}")
        value = dict(value)
        if "src" in value and "path" not in value:  # the official configs' name
            value["path"] = value.pop("src")
        value.pop("normalize_labels", None)  # official: statistics are computed here instead
        for key in [k for k in value if k.startswith("target_") or k.startswith("grad_target_")]:
            value.pop(key)
        return _build(cls, value, where)


@dataclass
class OptimConfig:
    """Optimisation settings; defaults are the paper's recipe (Zitnick et al. 2022, B.3).

    Learning rate: linear warm-up from ``warmup_factor * lr_initial`` over ``warmup_steps``,
    then ``scheduler: step`` multiplies by ``lr_gamma`` at each step in ``lr_milestones``, or
    ``scheduler: cosine`` decays to ``lr_min_factor * lr_initial`` at the last step.
    Loss: ``energy_coefficient * MAE(energy) + force_coefficient * L2-MAE(forces)``, both
    divided by the data's force scale (so the coefficients are dimensionless); the energy
    error per atom with ``per_atom_energy_loss``.
    """

    batch_size: int = 4
    eval_batch_size: int | None = None
    num_workers: int = 0
    optimizer: str = "AdamW"
    optimizer_params: dict[str, Any] = field(default_factory=lambda: {"amsgrad": True})
    lr_initial: float = 4e-4
    weight_decay: float = 0.0
    scheduler: str = "step"
    lr_gamma: float = 0.3
    lr_milestones: list[int] = field(default_factory=list)
    lr_min_factor: float = 0.01
    warmup_steps: int = 100
    warmup_factor: float = 0.2
    max_epochs: int | None = None
    max_steps: int | None = None
    clip_grad_norm: float | None = 100.0
    ema_decay: float | None = 0.999
    energy_coefficient: float = 2.0
    force_coefficient: float = 100.0
    per_atom_energy_loss: bool = False
    train_on_free_atoms: bool = True
    amp: str = "none"
    eval_every: int | None = None
    checkpoint_every: int | None = None

    SCHEDULERS = ("step", "cosine")
    AMP_MODES = ("none", "bf16", "fp16")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer.lower() != "adamw":
            raise ConfigError(f"optim.optimizer: only AdamW is supported (the paper's), got {self.optimizer!r}")
        if self.scheduler not in self.SCHEDULERS:
            raise ConfigError(f"optim.scheduler must be one of {self.SCHEDULERS}, got {self.scheduler!r}")
        if self.amp not in self.AMP_MODES:
            raise ConfigError(f"optim.amp must be one of {self.AMP_MODES}, got {self.amp!r}")
        if self.max_epochs is None and self.max_steps is None:
            raise ConfigError("optim: give max_epochs or max_steps")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if sorted(self.lr_milestones) != list(self.lr_milestones):
            raise ConfigError(f"optim.lr_milestones must be increasing, got {self.lr_milestones}")


@dataclass
class RunConfig:
    """Where and how a run executes."""

    output_dir: str = "runs/scn"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    progress: bool = True
    plots: bool = True
    dtype: str = "float32"
    # Optional wall-clock budget for training (validation included): after a few steps the
    # run's length (and a cosine schedule with it) is capped to what fits. Results then depend
    # on the machine's speed; leave unset for reproducible runs.
    time_budget_minutes: float | None = None
    # Structures read to fit the per-element energies and the force scale (None: all of them;
    # a few hundred thousand are plenty for OC20-sized sets).
    statistics_max_structures: int | None = None
    # torch.compile the interaction blocks with this backend ("inductor", or "aot_eager" to
    # capture graphs without generating code); null: eager. Direct-force models only (no
    # double backward through compiled code). Measured on this CPU: no faster, minutes to
    # compile (benchmarks/README.md); meant for GPUs.
    compile: str | None = None


@dataclass
class TrainConfig:
    """A whole training configuration (see the module docstring)."""

    model: dict[str, Any]
    optim: OptimConfig
    train: DataSource
    val: DataSource | None = None
    run: RunConfig = field(default_factory=RunConfig)
    ignored: list[str] = field(default_factory=list)
    #: the registry name of the model (``model.name``); ``model`` holds its other options
    model_name: str = "scn"

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-safe form (what checkpoints store)."""
        dataset = {"train": dataclasses.asdict(self.train)}
        if self.val is not None:
            dataset["val"] = dataclasses.asdict(self.val)
        return {
            "model": {"name": self.model_name, **self.model},
            "optim": dataclasses.asdict(self.optim),
            "dataset": dataset,
            "run": dataclasses.asdict(self.run),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path | None = None) -> "TrainConfig":
        """Parse and validate a configuration mapping (``base_dir`` resolves relative paths)."""
        raw = copy.deepcopy(raw)
        if not isinstance(raw, dict):
            raise ConfigError(f"a configuration is a mapping of sections, got {type(raw).__name__}")
        ignored = [f"{k}:" for k in _IGNORED_SECTIONS if raw.pop(k, None) is not None]
        unknown = set(raw) - {"model", "optim", "dataset", "run"}
        if unknown:
            raise ConfigError(f"unknown configuration sections {sorted(unknown)}; expected model, optim, dataset, run")
        model_name, model = _parse_model(raw.get("model") or {})
        optim_raw = dict(raw.get("optim") or {})
        ignored += [f"optim.{k}" for k in _IGNORED_OPTIM_KEYS if optim_raw.pop(k, None) is not None]
        optim = _build(OptimConfig, optim_raw, "optim")
        optim.validate()
        train, val = _parse_dataset(raw.get("dataset"), base_dir)
        run = _build(RunConfig, raw.get("run") or {}, "run")
        return cls(model=model, optim=optim, train=train, val=val, run=run, ignored=ignored, model_name=model_name)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML configuration; ``overrides`` are ``section.key=value`` strings (YAML values)."""
    path = Path(path)
    raw = _read_with_includes(path, seen=())
    for item in overrides or []:
        _apply_override(raw, item)
    return TrainConfig.from_dict(raw, base_dir=path.parent)


def _read_with_includes(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A YAML file merged over the files its ``includes:`` list names (relative to it), as the
    official configs are composed; the including file's values win."""
    if not path.exists():
        raise ConfigError(f"no such configuration file: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: includes itself (via {' -> '.join(str(p) for p in seen)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    includes = raw.pop("includes", None) or []
    merged: dict[str, Any] = {}
    for include in [includes] if isinstance(includes, str) else includes:
        merged = _merge(merged, _read_with_includes(path.parent / include, seen + (path.resolve(),)))
    return _merge(merged, raw)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def _parse_model(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(registry name, options)`` of a ``model:`` section, validated."""
    from ..models.config import ConfigError as ModelConfigError
    from ..models.registry import model_names, model_spec

    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping of options, got {model!r}")
    model = dict(model)
    name = model.pop("name", "scn")
    try:
        spec = model_spec(name)
    except ModelConfigError:
        raise ConfigError(f"model.name must be one of {list(model_names())}, got {name!r}") from None
    try:
        spec.config_class.from_official(model)  # validated here, so a bad option fails before any data is read
    except ModelConfigError as err:
        raise ConfigError(f"model: {err}") from None
    return spec.name, model


def _parse_dataset(dataset: Any, base_dir: Path | None) -> tuple[DataSource, DataSource | None]:
    if dataset is None:
        raise ConfigError("dataset: missing; give at least dataset.train")
    if isinstance(dataset, list):  # the official list form: [train, val, test]
        dataset = dict(zip(("train", "val", "test"), dataset))
    if not isinstance(dataset, dict) or "train" not in dataset:
        raise ConfigError("dataset: expected a mapping with 'train' (and optionally 'val')")
    unknown = set(dataset) - {"train", "val", "test"}
    if unknown:
        raise ConfigError(f"dataset: unknown entries {sorted(unknown)}; expected train, val")
    sources = []
    for name in ("train", "val"):
        if dataset.get(name) is None:
            sources.append(None)
            continue
        source = DataSource.parse(dataset[name], f"dataset.{name}")
        if base_dir is not None and not Path(source.path).is_absolute():
            source.path = str((base_dir / source.path).resolve())
        sources.append(source)
    return sources[0], sources[1]


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = {k: _coerce(v, types[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Numbers written as strings (PyYAML reads ``4e-4`` as a string) become numbers."""
    if not isinstance(value, str) or annotation.startswith("str"):
        return value
    for kind in (int, float):
        if annotation.startswith(kind.__name__):
            try:
                return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return value
