"""``scn train``: train a model (an SCN, a SchNet, ...) from a YAML configuration."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import add_trust_pickle_argument

__all__ = ["add_parser", "one_line"]

EPILOG = """\
run directory (run.output_dir):
  a new run needs a missing or empty directory; one that holds anything is refused, so that two
  runs never mix their logs: continue a checkpointed run with --resume, or start afresh with
  --overwrite (removes only what a run writes: config.yaml, checkpoints/, logs/, plots/,
  summary.json). --resume drops the log rows written after the checkpoint it continues from.

stopping:
  Ctrl-C or SIGTERM finishes the current step, saves checkpoints/last.pt and exits with 130
  (SIGINT) or 143 (SIGTERM), as shells report a process stopped by that signal; a second signal
  stops at once without saving. Continue with --resume. Other exit codes: 0 finished, 1 error
  (bad configuration or data, diverged training: the message says which).

examples:
  scn train configs/small/scn_demo.yaml
  scn train configs/small/scn_demo.yaml --resume                 # continue an interrupted run
  scn train configs/small/scn_demo.yaml --overwrite              # start the run afresh
  scn train configs/small/scn_demo.yaml --set optim.max_epochs=50 --set run.output_dir=runs/long
  scn train configs/small/schnet.yaml                            # the SchNet baseline, same data
  torchrun --nproc_per_node=4 $(which scn) train configs/paper/scn_4tap_2band.yaml   # 4 processes
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn train``."""
    p = subparsers.add_parser(
        "train",
        help="train a model (SCN, SchNet) from a YAML configuration",
        description=(
            "Train a model. CONFIG is a YAML file with model:, optim:, dataset: and run: sections; "
            "model.name picks the model (scn, the default, or schnet; the official configs' model: "
            "and optim: sections are accepted as they are). "
            "Checkpoints, logs (CSV, TensorBoard) and plots go to run.output_dir."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML configuration file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its last checkpoint")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh in a run.output_dir that holds an earlier run (removes what that run wrote)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a configuration value (repeatable), e.g. --set optim.batch_size=8")
    add_trust_pickle_argument(p)
    p.set_defaults(func=_run)


def one_line(err: BaseException) -> str:
    """An error's message on one line (an error re-raised from a DataLoader worker carries the
    worker's traceback: its last line is the original error)."""
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        return lines[-1]
    return " ".join(lines)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _fail(message: str) -> SystemExit:
    """Exit 1 with ``message`` (printed by the main process only)."""
    return SystemExit(f"scn train: {message}" if _is_main() else 1)


def _stopped(message: str, code: int) -> int:
    """Report a stopped run; its exit code."""
    if _is_main():
        print(f"scn train: {message}", file=sys.stderr, flush=True)
    return code


def _run(args: argparse.Namespace) -> int:
    from ..training import (
        ConfigError,
        RunDirectoryError,
        Trainer,
        TrainingDiverged,
        TrainingInterrupted,
        load_config,
    )

    expected = (ConfigError, RunDirectoryError, TrainingDiverged, ValueError, OSError)
    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, trust_pickle=args.trust_pickle)
    except expected as err:  # ValueError: DataError, CheckpointError; OSError: unreadable files
        raise _fail(one_line(err)) from None
    except KeyboardInterrupt:
        return _stopped("interrupted before training started (nothing was saved)", 130)
    if config.ignored and trainer.ctx.is_main:
        print(f"ignored (no meaning here): {', '.join(config.ignored)}")
    try:
        summary = trainer.train()
    except TrainingInterrupted as err:
        return _stopped(one_line(err), err.exit_code)
    except KeyboardInterrupt:
        return _stopped(f"interrupted; {trainer.kept_checkpoint()}", 130)
    except expected as err:
        raise _fail(one_line(err)) from None
    finally:
        trainer.close()
    if trainer.ctx.is_main:
        print(json.dumps({"steps": summary["steps"], "final_val": summary["final_val"], "best": summary["best"]}, indent=2))
        print(f"run directory: {config.run.output_dir}")
    return 0
