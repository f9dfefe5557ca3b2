"""Train the small SCN ablations briefly and measure their equivariance (paper Appendix A).

For each configuration of ``configs/small`` (default: the demo model and its m = 0, 1-tap,
m <= 2 and no-grid ablations) this runs ``scn train CONFIG`` for ``--minutes`` on the data of
``scn data generate DIR --size small``, then :func:`spherical_channels.diagnostics.diagnose` on
the first ``--structures`` validation structures (val_id) with the trained checkpoint
(``best.pt``, else ``last.pt``). It prints a markdown table (Table 4 energy/force MAD, also as a
percentage of the MAE as the paper gives it; Table 5 mean over layers; Table 6) and one JSON
line per model, and writes each full report to ``OUT/NAME/diagnose.json``.

    OMP_NUM_THREADS=1 python benchmarks/diagnose_ablations.py --data data/reference --minutes 2 --out runs/diag

The paper's orderings (Table 4, 12-layer OC20 models) to compare with: m = 0 and m in [-1, 1]
with 4 taps far below 1-tap m in [-1, 1]; without the 1x1 grid network, the force MAD far below
the grid's (the energy MAD barely changes). Brief training on a small EMT set gives models far
from converged, so read the orderings, not the values.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("scn_demo", "scn_small_m0", "scn_small_m1_1tap", "scn_small_m2", "scn_small_no_grid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "reference",
                   help="directory written by 'scn data generate DIR --size small'")
    p.add_argument("--minutes", type=float, default=2.0, help="training budget per model (default 2)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "diagnose_ablations", help="run directories and reports")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help="names in configs/small (default: the five ablations)")
    p.add_argument("--structures", type=int, default=50, help="validation structures to diagnose on (default 50)")
    p.add_argument("--rotations", type=int, default=4, help="random rotations per structure (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=("bf16",), default=None, help="also measure under bf16 autocast")
    p.add_argument("--skip-train", action="store_true", help="reuse the checkpoints already in OUT")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the checkpoints and reports (OUT/NAME/diagnose.json) already in OUT: only print the tables")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.structures < 1 or args.rotations < 1:
        p.error("--minutes must be > 0, --structures and --rotations >= 1")
    for split in ("train", "val_id"):
        if not (args.data / "s2ef" / f"{split}.extxyz").exists():
            p.error(f"{args.data} has no s2ef/{split}.extxyz: make it with 'scn data generate {args.data} --size small'")
    for name in args.configs:
        if not (REPO / "configs" / "small" / f"{name}.yaml").exists():
            p.error(f"no configuration configs/small/{name}.yaml")
    return args


def train(name: str, args: argparse.Namespace) -> Path:
    """``scn train`` for ``args.minutes``; the run directory. Its output goes to ``train.log``."""
    run_dir = args.out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = {
        "dataset.train.path": (args.data / "s2ef" / "train.extxyz").resolve(),
        "dataset.val.path": (args.data / "s2ef" / "val_id.extxyz").resolve(),
        "run.output_dir": run_dir.resolve(),
        "run.time_budget_minutes": args.minutes,
        "run.progress": "false",
        "run.plots": "false",
    }
    command = [sys.executable, "-m", "spherical_channels.cli", "train", str(REPO / "configs" / "small" / f"{name}.yaml"),
               "--overwrite"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    with open(args.out / f"{name}.train.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"training {name} failed (exit {done.returncode}); see {args.out / f'{name}.train.log'}")
    print(f"trained {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return run_dir


def checkpoint_of(run_dir: Path) -> Path:
    for candidate in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / candidate
        if path.exists():
            return path
    raise SystemExit(f"{run_dir}: no checkpoints/best.pt or last.pt (train first, or drop --skip-train)")


def summary_row(name: str, report: dict, precision: str) -> dict:
    """The markdown table's numbers for one model and precision (eV -> meV)."""
    t4, t6 = report["table4"][precision], report["table6"][precision]
    t5 = report["table5"][precision]
    milli = lambda value: None if value is None else 1e3 * value  # noqa: E731
    percent = lambda part, whole: 100.0 * part / whole if part is not None and whole else None  # noqa: E731
    model = report["model"]
    return {
        "model": name, "precision": precision,
        "mmax": model["mmax"], "taps": model["num_taps"], "grid": model["use_grid"],
        "energy_mae_meV": milli(t4["energy"]["mae"]), "energy_mad_meV": milli(t4["energy"]["mad"]),
        "energy_mad_percent_of_mae": t4["energy"]["percent_of_mae"], "energy_mad_percent": t4["energy"]["percent"],
        # the total energy is mostly the per-element references: put the MAD in the scale of
        # the part the network predicts (the energy head's, Table 6's reference values)
        "energy_mad_percent_of_network": percent(t4["energy"]["mad"], t6["energy"]["mean_abs"]),
        "force_mae_meV_A": milli(t4["forces"]["mae"]), "force_mad_meV_A": milli(t4["forces"]["mad"]),
        "force_mad_percent_of_mae": t4["forces"]["percent_of_mae"], "force_mad_percent": t4["forces"]["percent"],
        "table5_mean_percent": t5["mean_percent"],
        "table5_layer_percent": [row["percent"] for row in t5["layers"]],
        "table6_energy_mad_meV": milli(t6["energy"]["mad"]), "table6_energy_percent": t6["energy"]["percent"],
        "table6_force_mad_meV_A": milli(t6.get("forces", {}).get("mad")),
        "table6_force_percent": t6.get("forces", {}).get("percent"),
    }


def markdown(rows: list[dict], title: str) -> str:
    def g(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    lines = [
        f"**{title}**", "",
        "| model | m | taps | grid | E MAE meV | T4 E MAD meV | T4 E % MAE | T4 E % \\|E_net\\| | F MAE meV/Å "
        "| T4 F MAD meV/Å | T4 F % MAE | T4 F % \\|F\\| | T5 mean % | T6 E MAD meV | T6 E % | T6 F MAD meV/Å | T6 F % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mmax']} | {r['taps']} | {'yes' if r['grid'] else 'no'} | {g(r['energy_mae_meV'])} "
            f"| {g(r['energy_mad_meV'])} | {g(r['energy_mad_percent_of_mae'])} | {g(r['energy_mad_percent_of_network'])} "
            f"| {g(r['force_mae_meV_A'])} "
            f"| {g(r['force_mad_meV_A'])} | {g(r['force_mad_percent_of_mae'])} | {g(r['force_mad_percent'])} "
            f"| {g(r['table5_mean_percent'])} | {g(r['table6_energy_mad_meV'])} | {g(r['table6_energy_percent'])} "
            f"| {g(r['table6_force_mad_meV_A'])} | {g(r['table6_force_percent'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from spherical_channels.cli.common import open_structures, write_json
    from spherical_channels.diagnostics import diagnose
    from spherical_channels.models.checkpoint import load_model

    validation = open_structures(args.data / "s2ef" / "val_id.extxyz")
    structures = [validation[i] for i in range(min(args.structures, len(validation)))]
    rows: dict[str, list[dict]] = {}
    for name in args.configs:
        run_dir = args.out / name if (args.skip_train or args.reuse) else train(name, args)
        saved = run_dir / "diagnose.json"
        if args.reuse:
            if not saved.exists():
                raise SystemExit(f"--reuse: no {saved}; run without --reuse first")
            report = json.loads(saved.read_text())
        else:
            checkpoint = checkpoint_of(run_dir)
            model = load_model(checkpoint)  # float32, eval mode, EMA weights when present
            start = time.perf_counter()
            report = diagnose(model, structures, num_rotations=args.rotations, seed=args.seed, amp=args.amp,
                              progress=False)
            report["checkpoint"] = str(checkpoint)
            write_json(saved, report, indent=2)
            print(f"diagnosed {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for precision in report["precisions"]:
            row = summary_row(name, report, precision)
            rows.setdefault(precision, []).append(row)
            print(json.dumps(row), flush=True)
    for precision, table in rows.items():
        print()
        print(markdown(table, f"{precision}: {report['num_structures']} val_id structures x {report['num_rotations']} "
                              f"rotations, {args.minutes:g} min of training each"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
