"""Figures of a run: parity plots of predictions against references, learning curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["learning_curves", "parity_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def parity_plots(
    energy_pred: np.ndarray,
    energy_ref: np.ndarray,
    natoms: np.ndarray,
    force_pred: np.ndarray,
    force_ref: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """Predicted vs reference energy per atom and force components, with MAEs, as a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    e_pred, e_ref = np.asarray(energy_pred) / natoms, np.asarray(energy_ref) / natoms
    panels = [
        (axes[0], e_ref, e_pred, "energy per atom (eV/atom)", "meV/atom", 1000.0),
        (axes[1], np.ravel(force_ref), np.ravel(force_pred), "force components (eV/Å)", "meV/Å", 1000.0),
    ]
    for ax, ref, pred, label, unit, factor in panels:
        ref, pred = np.asarray(ref, float), np.asarray(pred, float)
        keep = np.isfinite(ref) & np.isfinite(pred)  # a structure without a reference is NaN here
        ref, pred = ref[keep], pred[keep]
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        if not ref.size:  # nothing to compare (no references, or no free atoms)
            ax.set_title("no reference values")
            continue
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
        ax.scatter(ref, pred, s=4, alpha=0.5)
        mae = float(np.abs(pred - ref).mean()) * factor
        ax.set_title(f"MAE {mae:.1f} {unit} ({ref.size} values)")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _positive(value: object, zero: bool = False) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or (zero and value == 0))


def learning_curves(train: Sequence[dict], val: Sequence[dict], path: str | Path) -> Path:
    """Training loss and validation energy/force MAEs against the step, as a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    curves = [(axes[0], train, "loss", "training loss"),
              (axes[1], val, "energy_mae", "validation energy_mae (eV)"),
              (axes[2], val, "force_mae", "validation force_mae (eV/Å)")]
    for ax, rows, key, title in curves:
        # log axes: only positive finite values (a metric with nothing to cover is NaN or empty)
        points = [(r["step"], r[key]) for r in rows if _positive(r.get(key)) and _positive(r.get("step"), zero=True)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, lw=1, marker="o" if key != "loss" else None)
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
