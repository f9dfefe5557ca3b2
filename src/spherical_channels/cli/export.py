"""``scn export``: a checkpoint as a deployable inference artefact (one ``.pt2`` file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import check_device, load_checkpoint_model, one_line, open_input_structures, prepare_output, write_json

__all__ = ["add_parser"]

FORMATS = ("aoti", "exported-program")  # deployment.FORMATS, named here so that --help needs no torch


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn export``."""
    from .common import add_trust_pickle_argument

    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to a deployable .pt2 file (AOTInductor or ExportedProgram)",
        description=(
            "Export the energy and forces of a checkpoint's model (SCN or SchNet) to one .pt2 file that runs "
            "without the Python model: forces are -dE/dx inside the program for energy-conserving models, "
            "and atom, edge and structure counts are dynamic; the neighbour graph is built in Python when the "
            "file is used. --format aoti (default) compiles it with AOTInductor into a shared library (fastest "
            "to run; compiling takes minutes); exported-program saves the torch.export program (seconds). The "
            "file is checked against the model on the example structures before it is written. Load it with "
            "spherical_channels.deployment.load_exported(path, trust_pickle=True) and pass that to "
            "SCNCalculator or relax_many (with the file's dtype). CHECKPOINT may be 'example'."
        ),
    )
    p.add_argument("checkpoint", help="checkpoint file, or 'example'")
    p.add_argument("output", type=Path, help="the artefact to write (*.pt2)")
    p.add_argument("--format", choices=FORMATS, default="aoti", help="aoti (default) or exported-program")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision the program is compiled for (default float32; the calculator's default)")
    p.add_argument("--device", default="cpu", help="device the program is compiled for (default cpu)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="'auto' uses EMA weights when the checkpoint has them")
    p.add_argument("--example", default=None,
                   help="structures to trace and check with (any file ASE reads; default: the package's examples)")
    p.add_argument("--json", type=Path, help="also write a report (metadata, timings, errors) as JSON")
    add_trust_pickle_argument(p)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from ..deployment import ExportError, export_model
    from ..resources import EXAMPLE_CHECKPOINT, resource_path

    checkpoint = resource_path(EXAMPLE_CHECKPOINT) if args.checkpoint == "example" else Path(args.checkpoint)
    output: Path = args.output
    if output.suffix != ".pt2":
        raise SystemExit(f"scn export: the output is a PT2 archive: name it *.pt2 (got {output})")
    if args.json is not None and args.json.resolve() == output.resolve():
        raise SystemExit("scn export: the output and --json name the same file")
    device = check_device("export", args.device)
    prepare_output("export", output)
    prepare_output("export", args.json)
    dtype = getattr(torch, args.dtype)
    _, model = load_checkpoint_model("export", checkpoint, weights=args.weights, device=device, dtype=dtype,
                                     trust_pickle=args.trust_pickle)
    example = None
    if args.example is not None:
        example = list(open_input_structures("export", args.example))
    try:
        report = export_model(model, output, format=args.format, dtype=dtype, device=device, example=example,
                              source=str(checkpoint), weights=args.weights)
    except ExportError as err:
        raise SystemExit(f"scn export: {checkpoint}: {one_line(err)}") from None
    info = report.info
    if args.json is not None:
        write_json(args.json, {
            "output": str(report.path), "metadata": {**_plain(info), "graph": info.graph.to_dict()},
            "seconds": report.seconds, "energy_error": report.energy_error, "force_error": report.force_error,
            "num_checked": report.num_checked, "bytes": report.path.stat().st_size,
        })
    if not args.quiet:
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report.seconds.items())
        forces = "-dE/dx" if info.conservative else "direct head" if info.regress_forces else "none"
        print(f"wrote {report.path} ({info.format}, {info.model_name}, {info.dtype} on {info.device}, forces: {forces}; "
              f"{report.path.stat().st_size / 1e6:.1f} MB)")
        print(f"  {stages}")
        print(f"  checked on {report.num_checked} structures: max |dE| = {report.energy_error:.2g} eV, "
              f"max |dF| = {report.force_error:.2g} eV/Å")
    return 0


def _plain(info) -> dict:  # noqa: ANN001 - an ArtefactInfo
    from dataclasses import asdict

    return asdict(info)
