"""A property-test suite for interatomic potentials, shipped with the package.

Run it on any model (``model(batch) -> {"energy", "forces"}``)::

    from spherical_channels.testing import run_property_suite, scn_expectations
    report = run_property_suite(model, expectations=scn_expectations(model.config))
    print(report.table())
    report.assert_passed()

See :mod:`.properties` for what is measured and how errors are normalised.
"""

from .properties import PROPERTIES, Expectations, PropertyContext, PropertyResult, Tolerances
from .pytest_helpers import pytest_properties
from .report import PropertySuiteFailure, SuiteReport
from .scn import read_model_options, scn_expectations, shrink_options
from .structures import Structure, default_structures, symmetric_crystal
from .suite import prepare_model, run_property_suite

__all__ = [
    "PROPERTIES",
    "Expectations",
    "PropertyContext",
    "PropertyResult",
    "PropertySuiteFailure",
    "Structure",
    "SuiteReport",
    "Tolerances",
    "default_structures",
    "prepare_model",
    "pytest_properties",
    "read_model_options",
    "run_property_suite",
    "scn_expectations",
    "shrink_options",
    "symmetric_crystal",
]
