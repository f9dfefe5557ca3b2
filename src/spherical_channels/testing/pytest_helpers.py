"""A pytest entry point: one test per property and dtype for any model.

In a test file of your own::

    from spherical_channels.testing import Expectations, pytest_properties

    test_my_model = pytest_properties(
        lambda: MyModel(...),                        # a fresh model per test
        expectations=Expectations(rotation_energy=1e-3, rotation_forces=1e-2),
    )

``pytest`` then collects ``test_my_model[translation-float32]``, ... (one per property and
dtype); a failing one prints the report's table. pytest is imported only when this is called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .properties import PROPERTIES, Expectations, Tolerances, dtype_name
from .structures import Structure
from .suite import run_property_suite

__all__ = ["pytest_properties"]


def pytest_properties(
    model_factory: Callable[[], Any],
    *,
    expectations: Expectations | Callable[[Any], Expectations] | None = None,
    structures: Sequence[Structure] | Callable[[], Sequence[Structure]] | None = None,
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.float64),
    properties: Iterable[str] | None = None,
    tolerances: Tolerances | None = None,
    **settings: Any,
) -> Callable[[torch.dtype, str], None]:
    """A pytest test function parametrized over ``properties`` x ``dtypes``.

    Args:
        model_factory: builds the model (called once per test).
        expectations: an :class:`Expectations`, or a function of the model giving one (e.g.
            :func:`~.scn.scn_expectations`).
        structures: structures, or a function building them (default: the suite's).
        dtypes, properties, tolerances, settings: as :func:`~.suite.run_property_suite`.
    """
    import pytest

    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {list(PROPERTIES)}")
    params = [pytest.param(dtype, name, id=f"{name}-{dtype_name(dtype)}") for name in names for dtype in dtypes]

    @pytest.mark.parametrize(("dtype", "property_name"), params)
    def test_property(dtype: torch.dtype, property_name: str) -> None:
        model = model_factory()
        expected = expectations(model) if callable(expectations) else expectations
        report = run_property_suite(
            model,
            structures=structures() if callable(structures) else structures,
            dtypes=[dtype],
            tolerances=tolerances,
            expectations=expected,
            properties=[property_name],
            **settings,
        )
        print(report.table())
        report.assert_passed()

    return test_property
