"""Figures of a run: parity plots of predictions against references, learning curves."""

from __future__ import annotations

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
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
        ax.scatter(ref, pred, s=4, alpha=0.5)
        mae = float(np.abs(pred - ref).mean()) * factor
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(f"MAE {mae:.1f} {unit}")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curves(train: Sequence[dict], val: Sequence[dict], path: str | Path) -> Path:
    """Training loss and validation energy/force MAEs against the step, as a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set_title("training loss")
    for ax, key, unit in ((axes[1], "energy_mae", "eV"), (axes[2], "force_mae", "eV/Å")):
        rows = [r for r in val if key in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o")
        ax.set_title(f"validation {key} ({unit})")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
