"""``scn diagnose``: the paper's Appendix A equivariance measurements (Tables 4-6) of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser"]

EPILOG = """\
tables (paper Appendix A):
  4  the whole model on randomly rotated structures, forces rotated back (eqs. 13-14): any model
  5  each layer's message aggregation alone, inputs captured on the structures (eq. 16): SCN only;
     with the 1x1 grid network, also the paper's activation/depth rows on the same weights
  6  the energy and force output blocks on the final features rotated by D(R) (eqs. 17-18): SCN only

MADs are given in meV (meV/A) and as a percentage of the mean absolute value; Table 4 also as a
percentage of the MAE when the structures carry reference energies and forces (the paper's
scale). SCNs are measured in eval mode with the fixed roll, so the rotation is the only
difference between the two inputs.

examples:
  scn diagnose runs/scn_demo/checkpoints/best.pt data/reference/s2ef/val_id.extxyz --max-structures 50
  scn diagnose best.pt val.extxyz --rotations 8 --amp bf16 --json diag.json --plot diag.png
  scn diagnose example example --dtype float64       # the bundled random-weight checkpoint
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn diagnose``."""
    from .common import add_trust_pickle_argument

    p = subparsers.add_parser(
        "diagnose",
        help="measure a checkpoint's equivariance to rotations (paper Appendix A, Tables 4-6)",
        description=(
            "Measure how far CHECKPOINT is from rotation equivariance on STRUCTURES, as the paper's "
            "Appendix A does: the whole model (Table 4), each layer's message aggregation (Table 5) "
            "and the output blocks (Table 6). CHECKPOINT is a checkpoint of this package or of the "
            "official implementation, or 'example'; STRUCTURES is a data set or any file ASE reads, "
            "or 'example'."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint file, or 'example'")
    p.add_argument("structures", help="structure file (extxyz, .db, .aselmdb, ...), or 'example'")
    p.add_argument("--rotations", type=int, default=4, help="random rotations per structure (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rotations (default 0)")
    p.add_argument("--max-structures", type=int, help="use the first N structures only")
    p.add_argument("--batch-size", type=int, default=8, help="structures per model call (default 8)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of the model (default float32, the paper's 'No AMP')")
    p.add_argument("--amp", choices=("bf16",), default=None,
                   help="also measure under mixed precision (torch.autocast, bfloat16; needs --dtype float32)")
    p.add_argument("--no-variants", action="store_true",
                   help="skip Table 5's swapped-activation rows")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--plot", type=Path, help="write a figure (one panel per table; .png, .pdf, .svg)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_trust_pickle_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    p.set_defaults(func=_run)


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("rotations", "max_structures", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"scn diagnose: --{name.replace('_', '-')} must be >= 1, got {value}")
    if args.amp is not None and args.dtype != "float32":
        raise SystemExit(f"scn diagnose: --amp {args.amp} needs --dtype float32 (autocast leaves float64 "
                         "operations in float64)")
    if args.plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        suffix = args.plot.suffix.lower().lstrip(".")
        if suffix not in formats:
            raise SystemExit(f"scn diagnose: --plot {args.plot}: unknown figure format {args.plot.suffix or '(none)'!r}; "
                             f"use one of {', '.join('.' + f for f in sorted(formats))}")
    if args.json is not None and args.plot is not None and args.json.resolve() == args.plot.resolve():
        raise SystemExit("scn diagnose: --json and --plot name the same file")


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..diagnostics.report import diagnose, format_report, plot_report
    from ..resources import EXAMPLE_CHECKPOINT, EXAMPLE_STRUCTURES, resource_path
    from .common import (
        check_device,
        describe_failure,
        load_checkpoint_model,
        naming,
        one_line,
        open_input_structures,
        prepare_output,
        write_json,
    )

    _check_arguments(args)
    checkpoint = resource_path(EXAMPLE_CHECKPOINT) if args.checkpoint == "example" else Path(args.checkpoint)
    source = resource_path(EXAMPLE_STRUCTURES) if args.structures == "example" else Path(args.structures)
    device = check_device("diagnose", args.device)
    _, model = load_checkpoint_model("diagnose", checkpoint, device=device, dtype=getattr(torch, args.dtype),
                                     trust_pickle=args.trust_pickle)
    dataset = open_input_structures("diagnose", source, trust_pickle=args.trust_pickle)
    prepare_output("diagnose", args.json)
    prepare_output("diagnose", args.plot)
    count = len(dataset) if args.max_structures is None else min(len(dataset), args.max_structures)
    structures = _FirstN(dataset, count)
    try:
        report = diagnose(model, structures, num_rotations=args.rotations, seed=args.seed, amp=args.amp,
                          batch_size=args.batch_size, variants=not args.no_variants, progress=not args.quiet)
    except ValueError as err:
        message = one_line(err)
        if message.startswith("structure "):  # "structure I: why" -> name the file too
            index, _, why = message.removeprefix("structure ").partition(": ")
            if index.isdigit():
                message = describe_failure(source, int(index), why)
        raise SystemExit(f"scn diagnose: {naming(source, message)}") from None
    report["checkpoint"], report["structures"] = str(checkpoint), str(source)
    if not args.quiet:
        print(format_report(report))
    if args.json is not None:
        write_json(args.json, report, indent=2)
    if args.plot is not None:
        plot_report(report, args.plot)
    return 0


class _FirstN:
    """The first ``count`` items of a random-access sequence, read when asked for."""

    def __init__(self, data, count: int) -> None:  # noqa: ANN001 - any sequence of ase.Atoms
        self.data, self.count = data, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):  # noqa: ANN204
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.data[index]
