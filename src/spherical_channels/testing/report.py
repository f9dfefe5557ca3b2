"""The suite's report: every result, a printable table and a JSON-friendly dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .properties import PropertyResult

__all__ = ["PropertySuiteFailure", "SuiteReport"]


class PropertySuiteFailure(AssertionError):
    """A model failed properties of the suite (the message is the report's table)."""


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value == value else "nan"


@dataclass
class SuiteReport:
    """Results of :func:`~.suite.run_property_suite`.

    Attributes:
        model: a description of the model (class name, and its config where it has one).
        results: every result, property by property, dtype by dtype.
        seconds: wall time per (property, dtype) as ``"name/dtype"``.
    """

    model: str
    results: list[PropertyResult]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No result failed or raised."""
        return all(r.passed for r in self.results)

    def failures(self) -> list[PropertyResult]:
        return [r for r in self.results if not r.passed]

    def get(self, name: str, dtype: str) -> PropertyResult:
        """The result ``name`` in ``dtype`` (``"float32"`` / ``"float64"``); KeyError if absent."""
        for r in self.results:
            if r.name == name and r.dtype == dtype:
                return r
        known = sorted({(r.name, r.dtype) for r in self.results})
        raise KeyError(f"no result {name!r} in {dtype}; have {known}")

    def table(self) -> str:
        """One line per result: name, dtype, status, value, tolerance, and a short note."""
        rows = [("property", "dtype", "status", "value", "tolerance", "note")]
        for r in self.results:
            note = r.details.get("reason") or r.details.get("error") or ""
            if r.name == "smoothness" and "median_step" in r.details:
                note = f"eV; median step {_number(r.details['median_step'])} eV over {r.details['steps']} steps"
            rows.append((r.name, r.dtype, r.status, _number(r.value), _number(r.tolerance), str(note)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [f"property suite: {self.model}"]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + ("  " + row[5] if row[5] else ""))
        lines.append(f"{'passed' if self.passed else 'FAILED'}: {sum(r.passed for r in self.results)}/{len(self.results)}; {sum(self.seconds.values()):.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "passed": self.passed,
            "results": [r.to_dict() for r in self.results],
            "seconds": dict(self.seconds),
        }

    def assert_passed(self) -> None:
        """Raise :class:`PropertySuiteFailure` (an AssertionError) with the table if anything
        failed."""
        if not self.passed:
            names = ", ".join(f"{r.name}/{r.dtype}" for r in self.failures())
            raise PropertySuiteFailure(f"failed: {names}\n{self.table()}")
