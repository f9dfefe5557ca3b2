"""Run the property suite on a model in each dtype."""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable, Iterable, Sequence

import torch

from .properties import PROPERTIES, Expectations, PropertyContext, PropertyResult, Tolerances, dtype_name
from .report import SuiteReport
from .structures import Structure, default_structures

__all__ = ["prepare_model", "run_property_suite"]


def prepare_model(model: Callable, dtype: torch.dtype) -> Callable:
    """A copy of ``model`` in ``dtype`` and eval mode (the caller's model is left as it is);
    a plain callable (not a ``torch.nn.Module``) is used as it is."""
    if isinstance(model, torch.nn.Module):
        return copy.deepcopy(model).to(dtype).eval()
    return model


def _describe(model: Callable) -> str:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        keys = ("lmax", "mmax", "num_taps", "num_bands", "use_grid", "edge_rotation", "direct_forces", "neighbor_ties", "max_num_neighbors", "cutoff")
        values = config.to_dict()
        shown = ", ".join(f"{k}={values[k]}" for k in keys if k in values)
        return f"{name}({shown})"
    return name


def run_property_suite(
    model: Callable,
    structures: Sequence[Structure] | None = None,
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.float64),
    tolerances: Tolerances | None = None,
    expectations: Expectations | None = None,
    properties: Iterable[str] | None = None,
    seed: int = 0,
    **settings,
) -> SuiteReport:
    """Measure every property of ``model`` in every dtype.

    Args:
        model: ``model(batch) -> {"energy", "forces"?}`` (see :mod:`.properties`); a
            ``torch.nn.Module`` is copied into each dtype and eval mode.
        structures: the test structures (default :func:`~.structures.default_structures`).
        dtypes: float32 and/or float64.
        tolerances: rounding and finite-difference tolerances (default :class:`Tolerances`).
        expectations: which properties the model satisfies exactly and the bounds of the others
            (default: every property exact; for an SCN use :func:`~.scn.scn_expectations`).
        properties: names from :data:`~.properties.PROPERTIES` (default: all).
        seed: seeds rotations, permutations and shifts.
        settings: further :class:`~.properties.PropertyContext` fields (``num_rotations``,
            ``fd_atoms``, ``smoothness_steps``, ``smoothness_length``, ``chunk``).

    A property that raises is recorded as an ``"error"`` result (the suite goes on).
    """
    structures = default_structures() if structures is None else list(structures)
    if not structures:
        raise ValueError("run_property_suite: no structures")
    for s in structures:
        if not isinstance(s, Structure):
            raise TypeError(f"structures must be spherical_channels.testing.Structure, got {type(s).__name__}")
    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {list(PROPERTIES)}")
    dtypes = list(dtypes)
    for dtype in dtypes:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the suite runs in torch.float32 and torch.float64, not {dtype}")
    unknown_settings = set(settings) - {"num_rotations", "fd_atoms", "smoothness_steps", "smoothness_length", "chunk"}
    if unknown_settings:
        raise TypeError(f"unknown suite settings {sorted(unknown_settings)}")
    tolerances = tolerances or Tolerances()
    expectations = expectations or Expectations()

    results: list[PropertyResult] = []
    seconds: dict[str, float] = {}
    for dtype in dtypes:
        prepared = prepare_model(model, dtype)
        ctx = PropertyContext(dtype=dtype, tolerances=tolerances, expectations=expectations, seed=seed, **settings)
        for name in names:
            start = time.perf_counter()
            try:
                results.extend(PROPERTIES[name](prepared, structures, ctx))
            except Exception as error:  # noqa: BLE001 - one broken property must not hide the others
                results.append(
                    PropertyResult(
                        name,
                        dtype_name(dtype),
                        None,
                        None,
                        "error",
                        {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()},
                    )
                )
            seconds[f"{name}/{dtype_name(dtype)}"] = time.perf_counter() - start
    return SuiteReport(model=_describe(model), results=results, seconds=seconds)
