"""`cascade` — the command line of Cascade.

Each command group lives in its own module under jobs/ and exposes
`register(subparsers)`; handlers import heavy libraries (torch, pyspark, ...)
only when they run, so `cascade --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that register commands, in help order.
COMMAND_MODULES = (
    "jobs.data",
    "jobs.build_features",
    "jobs.train_retriever",
    "jobs.train_ranker",
    "jobs.services",
    "jobs.serve",
    "jobs.pipeline",
    "jobs.demo",
)


class _DropImportNoise(logging.Filter):
    """fbgemm_gpu logs one INFO line per shared library it loads, on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and "fbgemm_gpu" in record.pathname)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Cascade: two-stage recommender — features, retrieval, ranking, serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        mod.register(sub)
    return parser


# Library deprecation chatter (torch's ShardedTensor/DTensor notices, DDP stride hints, DCP's
# "single process" notice) that says nothing actionable to a user of the CLI; `-v` shows it.
# PYTHONWARNINGS also reaches the spawned training workers.
_QUIET_WARNINGS = ("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore:Grad strides do not match",
                   "ignore:torch.distributed is disabled")


def _quiet_warnings() -> None:
    import os
    import warnings

    for spec in _QUIET_WARNINGS:
        action, message, category = (spec.split(":") + ["", ""])[:3]
        warnings.filterwarnings(action, message=message,
                                category={"FutureWarning": FutureWarning, "DeprecationWarning": DeprecationWarning}
                                .get(category, Warning))
    if "PYTHONWARNINGS" not in os.environ:
        os.environ["PYTHONWARNINGS"] = ",".join(_QUIET_WARNINGS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_warnings()
    # Libraries that log every call at INFO (kafka-python, TorchRec's planner, fbgemm's loader, py4j).
    for name in ("kafka", "torchrec", "fbgemm_gpu", "root.fbgemm", "py4j", "torch.distributed", "faiss.loader",
                 "torch.fx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropImportNoise())
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        # Expected user-facing failures: one clear line, no traceback (use -v for one).
        if args.verbose:
            raise
        print(f"cascade {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
