"""The paper's Appendix A measurements on one model, as a report: :func:`diagnose` runs them,
:func:`format_report` prints them as tables and :func:`plot_report` draws them.

* Table 4 (eqs. 13-14): the whole model on rotated structures; any model.
* Table 5 (eq. 16): each layer's message aggregation alone (:mod:`.aggregation`); SCN only.
* Table 6 (eqs. 17-18): the output blocks on the final features (:mod:`.output_heads`); SCN only.

Every MAD is reported as an absolute value and as a percentage of the mean absolute reference
value; Table 4 adds the error against reference labels (MAE) when the structures carry them,
the paper's scale for its percentages. Each measurement runs in the model's dtype and, with
``amp="bf16"``, again under ``torch.autocast`` in bfloat16. All measurements and precisions
share the same random rotations (one per structure and draw), so they compare directly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.batch import AtomicBatch
from .aggregation import AGGREGATION_VARIANTS, aggregation_differences, capture_aggregation_inputs, describe_aggregation
from .equivariance import AbsDifference, draw_rotations, rotation_differences
from .output_heads import final_features, output_head_differences

__all__ = ["AMP_MODES", "diagnose", "format_report", "plot_report"]

#: Mixed-precision modes :func:`diagnose` can add to the model's own precision.
AMP_MODES = ("bf16",)

#: The grid network layout of this package's SCN (two SiLU layers, then a linear one).
MODEL_VARIANT = "silu-2"

_NOT_SCN = "Tables 5 and 6 measure blocks of an SCN; this model is a {name}: only Table 4 applies"


def _is_scn(model: nn.Module) -> bool:
    from ..models.scn import SCN

    return isinstance(model, SCN)


def _model_name(model: nn.Module) -> str:
    from ..models.registry import spec_of

    try:
        return spec_of(model).name
    except TypeError:
        return type(model).__name__


def _describe_model(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": _model_name(model),
        "class": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "conservative": bool(getattr(model, "conservative", False)),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    if _is_scn(model):
        from ..so3.taps import resolve_num_taps

        c = model.config
        info.update(
            num_interactions=c.num_interactions, lmax=c.lmax, mmax=c.mmax,
            num_taps=resolve_num_taps(c.num_taps, c.mmax), use_grid=c.use_grid, num_bands=c.num_bands,
            num_resolutions=c.num_resolutions, num_sphere_samples=c.num_sphere_samples,
            sphere_weighting=c.sphere_weighting, edge_rotation=c.edge_rotation,
        )
    return info


@contextlib.contextmanager
def _measuring(model: nn.Module, notes: list[str]) -> Iterator[None]:
    """Eval mode and, for an SCN, the fixed roll: the rotation is then the only difference
    between the two inputs. The model's mode and roll rule are restored on exit."""
    was_training = model.training
    model.eval()
    roll_changed = False
    if _is_scn(model) and model.edge_rotation and model.current_roll != "fixed":
        notes.append(f"the model's eval roll rule is {model.current_roll!r}; measured with the fixed one, "
                     "so that the rotation is the only difference")
        previous = model.config.eval_roll
        model.update_config(eval_roll="fixed")
        roll_changed = True
    try:
        yield
    finally:
        if roll_changed:
            model.update_config(eval_roll=previous)
        model.train(was_training)


def _precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _merge_all(target: dict, source: dict) -> None:
    """Merge nested dicts / lists of :class:`AbsDifference` into ``target`` (same layout)."""
    for key, value in source.items():
        if isinstance(value, AbsDifference):
            target.setdefault(key, AbsDifference()).merge(value)
        elif isinstance(value, list):
            slots = target.setdefault(key, [AbsDifference() for _ in value])
            for slot, item in zip(slots, value):
                slot.merge(item)
        else:
            _merge_all(target.setdefault(key, {}), value)


def _measure_batch(
    model: nn.Module, batch: AtomicBatch, rotations: list[torch.Tensor], variants: Sequence[str], scn: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"table4": rotation_differences(model, batch, rotations, errors=True)}
    if scn:
        inputs = capture_aggregation_inputs(model, batch)
        out["table5"] = aggregation_differences(model, batch, rotations, variants=variants, inputs=inputs)
        del inputs
        out["table6"] = output_head_differences(model, batch, rotations, features=final_features(model, batch))
    return out


def _locate_failure(model: nn.Module, structures: Sequence[Any], indices: range, dtype: torch.dtype,
                    device: torch.device, err: Exception) -> ValueError:
    """A ``ValueError`` naming the first structure of ``indices`` the model cannot take."""
    for index in indices:
        try:
            model(AtomicBatch.from_atoms([structures[index]], dtype=dtype, device=device))
        except Exception as single:  # noqa: BLE001 - whatever the model raises for it
            message = _first_line(single)
            if f"structure {index}" in message:  # a data set's structures may name themselves
                return ValueError(message)
            # a one-structure batch numbers its structure 0: the index in the input replaces it
            return ValueError(f"structure {index}: {message.removeprefix('structure 0: ')}")
    return ValueError(f"structures {indices.start}-{indices.stop - 1}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def diagnose(
    model: nn.Module,
    structures: Sequence[Any],
    num_rotations: int = 4,
    seed: int = 0,
    amp: str | None = None,
    *,
    batch_size: int = 8,
    variants: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the paper's Tables 4, 5 (per layer) and 6 on ``structures`` and return a JSON-ready
    report.

    Args:
        model: any model of this package (Tables 5-6 need an SCN; for others they say why
            not). Measured in eval mode with the fixed roll, in its own dtype and device.
        structures: ``ase.Atoms`` (a list or any random-access sequence).
        num_rotations: random rotations per structure.
        seed: seed of the rotations.
        amp: ``None``, or ``"bf16"`` to measure everything again under autocast (a float32
            model: autocast leaves float64 operations in float64).
        batch_size: structures per model call.
        variants: also Table 5's activation/depth rows (:data:`.aggregation.AGGREGATION_VARIANTS`)
            on the same weights and inputs.
        progress: show a progress bar.

    Returns:
        ``{"model", "num_structures", "num_atoms", "num_rotations", "seed", "precisions",
        "table4", "table5", "table6", "notes"}``; each table maps a precision to its results
        (see :func:`format_report`), Tables 5-6 are ``{"skipped": reason}`` for other models.
    """
    from tqdm import tqdm

    if num_rotations < 1:
        raise ValueError(f"num_rotations must be >= 1, got {num_rotations}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if amp is not None and amp not in AMP_MODES:
        raise ValueError(f"amp must be None or one of {AMP_MODES}, got {amp!r}")
    if len(structures) == 0:
        raise ValueError("no structures to measure")
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    if amp is not None and dtype != torch.float32:
        raise ValueError(f"amp={amp!r} needs a float32 model (autocast does not lower {dtype}); got {dtype}")
    precisions = [str(dtype).removeprefix("torch.")] + ([amp] if amp else [])
    scn = _is_scn(model)
    variant_names = list(AGGREGATION_VARIANTS) if (variants and scn and model.use_grid) else []
    notes: list[str] = []
    totals: dict[str, dict] = {p: {} for p in precisions}
    generator = torch.Generator().manual_seed(seed)
    num_atoms = 0
    starts = range(0, len(structures), batch_size)
    with _measuring(model, notes):
        for start in tqdm(starts, desc="diagnose", unit="batch", disable=not progress):
            indices = range(start, min(len(structures), start + batch_size))
            try:
                batch = AtomicBatch.from_atoms([structures[i] for i in indices], dtype=dtype, device=device)
                rotations = draw_rotations(batch.num_structures, num_rotations, generator)
                for precision in precisions:
                    with _precision(precision, device):
                        _merge_all(totals[precision], _measure_batch(model, batch, rotations, variant_names, scn))
            except (ValueError, RuntimeError, IndexError, KeyError) as err:
                raise _locate_failure(model, structures, indices, dtype, device, err) from err
            num_atoms += batch.num_atoms

    report: dict[str, Any] = {
        "model": _describe_model(model, dtype),
        "num_structures": len(structures),
        "num_atoms": num_atoms,
        "num_rotations": num_rotations,
        "seed": seed,
        "precisions": precisions,
        "roll": "fixed" if scn and model.edge_rotation else None,
        "table4": {p: _table4(totals[p]["table4"]) for p in precisions},
    }
    if scn:
        report["table5"] = {p: _table5(totals[p]["table5"], model) for p in precisions}
        report["table5_aggregation"] = describe_aggregation(model.interactions[0])
        report["table6"] = {p: _summaries(totals[p]["table6"]) for p in precisions}
        if not model.use_grid:
            notes.append("no 1x1 grid network: each layer keeps the sum of its messages, so Table 5 is exact "
                         "by construction (it measures rounding only)")
        if "forces" not in totals[precisions[0]]["table6"]:
            notes.append("energy-conserving model: forces are -dE/dx, there is no force head (eq. 18 does not apply)")
    else:
        reason = _NOT_SCN.format(name=report["model"]["name"])
        report["table5"] = report["table6"] = {"skipped": reason}
        notes.append(reason)
    report["notes"] = notes
    return report


def _summaries(values: dict[str, AbsDifference]) -> dict[str, dict]:
    return {name: acc.summary() for name, acc in values.items()}


def _table4(values: dict[str, AbsDifference]) -> dict[str, dict]:
    out = {}
    for name, error_name in (("energy", "energy_error"), ("forces", "force_error")):
        if name not in values:
            continue
        entry = values[name].summary()
        error = values.get(error_name)
        mae = error.mad if error is not None and error.count else None
        entry["mae"] = mae
        entry["percent_of_mae"] = 100.0 * entry["mad"] / mae if mae else None
        out[name] = entry
    return out


def _layers(per_layer: list[AbsDifference]) -> dict[str, Any]:
    layers = [{"layer": k + 1, **acc.summary()} for k, acc in enumerate(per_layer)]
    percents = [row["percent"] for row in layers if row["percent"] is not None]
    return {"layers": layers, "mean_percent": sum(percents) / len(percents) if percents else None}


def _table5(values: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    out = _layers(values["layers"])
    out["variants"] = {name: _layers(per_layer) for name, per_layer in values["variants"].items()}
    if out["variants"]:
        out["model_variant"] = MODEL_VARIANT
    return out


# ---------------------------------------------------------------------- text


def _g(value: float | None, scale: float = 1.0, percent: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * scale:.3g}" + ("%" if percent else "")


def format_report(report: dict[str, Any]) -> str:
    """The report as three fixed-width tables (MADs in meV and meV/Å, as the paper gives them)."""
    model = report["model"]
    lines = []
    head = f"{model['name']} ({model['dtype']}"
    if "mmax" in model:
        head += (f", {model['num_interactions']} layers, L={model['lmax']}, m<={model['mmax']}, "
                 f"{model['num_taps']} tap{'s' if model['num_taps'] != 1 else ''}, "
                 f"{'grid' if model['use_grid'] else 'no grid'}")
    lines.append(f"{head}): {report['num_structures']} structures, {report['num_atoms']} atoms, "
                 f"{report['num_rotations']} rotations each, seed {report['seed']}")
    lines += ["", "Table 4: whole model, rotated input (eqs. 13-14); % of mean |E| / |F| and of the MAE"]
    header = (f"{'precision':<10}{'E MAE meV':>11}{'E MAD meV':>11}{'% |E|':>10}{'% MAE':>9}"
              f"{'F MAE meV/A':>13}{'F MAD meV/A':>13}{'% |F|':>10}{'% MAE':>9}")
    lines += [header, "-" * len(header)]
    for precision, row in report["table4"].items():
        e, f = row.get("energy", {}), row.get("forces", {})
        lines.append(
            f"{precision:<10}{_g(e.get('mae'), 1e3):>11}{_g(e.get('mad'), 1e3):>11}{_g(e.get('percent'), percent=True):>10}"
            f"{_g(e.get('percent_of_mae'), percent=True):>9}{_g(f.get('mae'), 1e3):>13}{_g(f.get('mad'), 1e3):>13}"
            f"{_g(f.get('percent'), percent=True):>10}{_g(f.get('percent_of_mae'), percent=True):>9}"
        )
    lines += ["", "Table 5: message aggregation alone (eq. 16), % MAD of the mean |output|, per layer"]
    table5 = report["table5"]
    if "skipped" in table5:
        lines.append(f"  not applicable: {table5['skipped']}")
    else:
        if report.get("table5_aggregation"):
            lines.append(f"  aggregation: {report['table5_aggregation']}")
        precisions = list(table5)
        header = f"{'layer':<10}" + "".join(f"{p:>12}" for p in precisions)
        lines += [header, "-" * len(header)]
        for k, _ in enumerate(table5[precisions[0]]["layers"]):
            lines.append(f"{k + 1:<10}" + "".join(
                f"{_g(table5[p]['layers'][k]['percent'], percent=True):>12}" for p in precisions))
        lines.append(f"{'mean':<10}" + "".join(f"{_g(table5[p]['mean_percent'], percent=True):>12}" for p in precisions))
        first = table5[precisions[0]]
        if first.get("variants"):
            num_layers = len(first["layers"])
            lines += ["", f"  rows of the paper's Table 5: the same weights and inputs with F_c's activations "
                          f"swapped ({precisions[0]}; the model's own is {first['model_variant']})"]
            header = f"{'variant':<16}" + "".join(f"{'layer ' + str(k + 1):>10}" for k in range(num_layers)) + f"{'mean':>10}"
            lines += [header, "-" * len(header)]
            for name, rows in first["variants"].items():
                label = name + (" (model)" if name == first["model_variant"] else "")
                lines.append(f"{label:<16}" + "".join(f"{_g(r['percent'], percent=True):>10}" for r in rows["layers"])
                             + f"{_g(rows['mean_percent'], percent=True):>10}")
    lines += ["", "Table 6: output blocks on the final features rotated by D(R) (eqs. 17-18)"]
    table6 = report["table6"]
    if "skipped" in table6:
        lines.append(f"  not applicable: {table6['skipped']}")
    else:
        header = f"{'precision':<10}{'E MAD meV':>11}{'% |E|':>10}{'F MAD meV/A':>13}{'% |F|':>10}"
        lines += [header, "-" * len(header)]
        for precision, row in table6.items():
            e, f = row.get("energy", {}), row.get("forces", {})
            lines.append(f"{precision:<10}{_g(e.get('mad'), 1e3):>11}{_g(e.get('percent'), percent=True):>10}"
                         f"{_g(f.get('mad'), 1e3):>13}{_g(f.get('percent'), percent=True):>10}")
        lines.append("  (energies: the head's part; the per-element references and priors are invariant)")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- figure


def _positive(values: list[float | None], floor: float) -> list[float]:
    """Values for a log axis: missing or non-positive ones at ``floor`` (drawn as such)."""
    return [v if (v is not None and v > floor) else floor for v in values]


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per table (percent MADs on a log axis) written to ``path`` (PNG, PDF, SVG:
    by its suffix)."""
    from matplotlib.figure import Figure

    path = Path(path)
    floor = 1e-14  # percent; float64 round-off sits near 1e-12 %
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    precisions = report["precisions"]
    colours = ["tab:blue", "tab:orange"]

    def bars(ax: Any, table: dict, quantities: list[tuple[str, str]], title: str) -> None:
        width = 0.8 / len(precisions)
        for k, precision in enumerate(precisions):
            values = [table[precision].get(q, {}).get("percent") for q, _ in quantities]
            xs = [i + (k - (len(precisions) - 1) / 2) * width for i in range(len(quantities))]
            ax.bar(xs, _positive(values, floor), width=width, label=precision, color=colours[k % 2])
        ax.set_xticks(range(len(quantities)), [label for _, label in quantities])
        ax.set_yscale("log")
        ax.set_ylabel("MAD, % of mean |value|")
        ax.set_title(title)
        ax.legend()

    bars(axes[0], report["table4"], [("energy", "energy"), ("forces", "forces")], "Table 4: whole model")
    table5 = report["table5"]
    if "skipped" in table5:
        axes[1].text(0.5, 0.5, "not applicable\n(not an SCN)", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_title("Table 5: message aggregation")
        axes[1].set_axis_off()
    else:
        ax = axes[1]
        for k, precision in enumerate(precisions):
            layers = table5[precision]["layers"]
            ax.plot([r["layer"] for r in layers], _positive([r["percent"] for r in layers], floor), "o-",
                    label=precision, color=colours[k % 2])
        others = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"]
        variants = table5[precisions[0]].get("variants", {})
        for colour, (name, rows) in zip(others, ((n, r) for n, r in variants.items()
                                                 if n != table5[precisions[0]].get("model_variant"))):
            layers = rows["layers"]
            ax.plot([r["layer"] for r in layers], _positive([r["percent"] for r in layers], floor), ":",
                    label=f"{name} (same weights, {precisions[0]})", color=colour)
        ax.set_yscale("log")
        ax.set_xticks([r["layer"] for r in table5[precisions[0]]["layers"]])
        ax.set_xlabel("layer")
        ax.set_ylabel("MAD, % of mean |output|")
        ax.set_title("Table 5: message aggregation (eq. 16)")
        ax.legend(fontsize="small")
    table6 = report["table6"]
    if "skipped" in table6:
        axes[2].text(0.5, 0.5, "not applicable\n(not an SCN)", ha="center", va="center", transform=axes[2].transAxes)
        axes[2].set_title("Table 6: output blocks")
        axes[2].set_axis_off()
    else:
        quantities = [("energy", "energy"), ("forces", "forces")]
        if "forces" not in table6[precisions[0]]:
            quantities = quantities[:1]
        bars(axes[2], table6, quantities, "Table 6: output blocks (eqs. 17-18)")
    fig.suptitle(f"{report['model']['name']}: equivariance under rotation, {report['num_structures']} structures "
                 f"x {report['num_rotations']} rotations (a value of 0 is drawn at {floor:g}%)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
