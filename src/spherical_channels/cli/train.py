"""``scn train``: train an SCN from a YAML configuration."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser"]

EPILOG = """\
examples:
  scn train configs/small/scn_demo.yaml
  scn train configs/small/scn_demo.yaml --resume                 # continue an interrupted run
  scn train configs/small/scn_demo.yaml --set optim.max_epochs=50 --set run.output_dir=runs/long
  torchrun --nproc_per_node=4 $(which scn) train configs/paper/scn_4tap_2band.yaml   # 4 processes
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn train``."""
    p = subparsers.add_parser(
        "train",
        help="train an SCN from a YAML configuration",
        description=(
            "Train an SCN. CONFIG is a YAML file with model:, optim:, dataset: and run: sections "
            "(the official SCN configs' model: and optim: sections are accepted as they are). "
            "Checkpoints, logs (CSV, TensorBoard) and plots go to run.output_dir."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML configuration file")
    p.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a configuration value (repeatable), e.g. --set optim.batch_size=8")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..training import ConfigError, Trainer, TrainingDiverged, load_config

    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"scn train: {err}") from None
    if config.ignored and trainer.ctx.is_main:
        print(f"ignored (no meaning here): {', '.join(config.ignored)}")
    try:
        summary = trainer.train()
    except TrainingDiverged as err:
        raise SystemExit(f"scn train: {err}") from None
    except ValueError as err:  # bad structures met while streaming the data
        raise SystemExit(f"scn train: {err}") from None
    finally:
        trainer.close()
    if trainer.ctx.is_main and "final_val" in summary:
        print(json.dumps({"steps": summary["steps"], "final_val": summary["final_val"], "best": summary["best"]}, indent=2))
        print(f"run directory: {config.run.output_dir}")
    return 0
