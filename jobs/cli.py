"""`cascade` — the command line of Cascade.

Each command group lives in its own module under jobs/ and exposes
`register(subparsers)`; handlers import heavy libraries (torch, pyspark, ...)
only when they run, so `cascade --help` stays fast. The operator commands that
belong to no job live here:

    cascade --version                                     # package version and git commit
    cascade config show ranker --config ranking/configs/ml-1m.yaml --config ranking/configs/ablations/din.yaml
    cascade config show serve --config serving/serving.example.yaml grpc.max_workers=4
    cascade config validate pipeline --config pipeline.yaml    # exit 1 naming the file, key and value
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

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


def version_string() -> str:
    """``cascade <package version> (git <commit>[-dirty])``; without a checkout, the package version alone."""
    from importlib.metadata import PackageNotFoundError, version

    from jobs.pipeline import code_version

    try:
        pkg = version("cascade")
    except PackageNotFoundError:
        pkg = "(not installed)"
    commit = code_version()
    return f"cascade {pkg}" + ("" if commit.startswith("cascade ") else f" (git {commit})")


class _VersionAction(argparse.Action):
    """Like argparse's "version" action, but the commit is looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        print(version_string())
        parser.exit()


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ConfigKind:
    """How one job kind loads its config: the dataclass, and the job's own loader (files, overrides)."""

    cls: Callable[[], type]
    load: Callable[[list[Path], list[str]], Any]
    layered: bool = False  # the job accepts several --config files, applied in order


def _single(kind: str, paths: list[Path]) -> Path | None:
    if len(paths) > 1:
        raise ValueError(f"{kind} takes one --config file, got {len(paths)}: {', '.join(map(str, paths))}")
    return paths[0] if paths else None


def _config_kinds() -> dict[str, ConfigKind]:
    from features.config import load_config

    def serve_cls() -> type:
        from serving.config import ServingConfig
        return ServingConfig

    def serve(paths: list[Path], overrides: list[str]) -> Any:
        from serving.app import load_serving_config
        return load_serving_config(_single("serve", paths), overrides)  # + CASCADE_* environment, as `cascade serve`

    def retriever_cls() -> type:
        from retrieval.config import RetrieverConfig
        return RetrieverConfig

    def retriever(paths: list[Path], overrides: list[str]) -> Any:
        from jobs.train_retriever import load_retriever_config
        return load_retriever_config(paths, overrides)

    def ranker_cls() -> type:
        from ranking.config import RankerConfig
        return RankerConfig

    def ranker(paths: list[Path], overrides: list[str]) -> Any:
        from jobs.train_ranker import load_ranker_config
        return load_ranker_config(paths, overrides)

    def features_cls() -> type:
        from features.spark.config import FeatureBuildConfig
        return FeatureBuildConfig

    def pipeline_cls() -> type:
        from jobs.pipeline import PipelineConfig
        return PipelineConfig

    def pipeline(paths: list[Path], overrides: list[str]) -> Any:
        from jobs.pipeline import load_pipeline_config
        return load_pipeline_config(_single("pipeline", paths), overrides)

    return {
        "serve": ConfigKind(serve_cls, serve),
        "retriever": ConfigKind(retriever_cls, retriever, layered=True),
        "ranker": ConfigKind(ranker_cls, ranker, layered=True),
        "features": ConfigKind(features_cls, lambda p, o: load_config(features_cls(), _single("features", p), o)),
        "pipeline": ConfigKind(pipeline_cls, pipeline),
    }


CONFIG_KINDS = ("serve", "retriever", "ranker", "features", "pipeline")
CONFIG_JOBS = {"serve": "serve", "retriever": "train-retriever", "ranker": "train-ranker",
               "features": "build-features", "pipeline": "pipeline run"}


def load_effective_config(kind: str, paths: list[Path], overrides: list[str]) -> Any:
    """The config `kind`'s job would run with; a ValueError names the file (or the overrides) at fault."""
    from features.config import load_config

    spec = _config_kinds()[kind]
    if len(paths) > 1 and not spec.layered:
        _single(kind, paths)
    cfg = None
    for path in paths:  # each file on its own (on top of the earlier ones), to say which one is wrong
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            cfg = load_config(spec.cls(), path, base=cfg)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    try:
        return spec.load(paths, overrides)
    except ValueError as e:
        where = f"overrides {' '.join(overrides)}" if overrides else "environment (CASCADE_*) or the combined files"
        raise ValueError(f"{where}: {e}") from None


def _config_show(args: argparse.Namespace) -> int:
    import yaml

    from jobs.pipeline import _config_dict  # the masked dict the pipeline logs: passwords as ***

    cfg = load_effective_config(args.kind, args.config, args.overrides)
    print(f"# effective {args.kind} config ({type(cfg).__module__}.{type(cfg).__name__})")
    print(yaml.safe_dump(_config_dict(cfg), sort_keys=False), end="")
    return 0


def _config_validate(args: argparse.Namespace) -> int:
    cfg = load_effective_config(args.kind, args.config, args.overrides)
    files = ", ".join(map(str, args.config)) or "defaults"
    print(f"ok: {args.kind} config ({type(cfg).__name__}) from {files}" + (f" + {len(args.overrides)} override(s)"
                                                                          if args.overrides else ""))
    return 0


def _register_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or validate the effective typed config of a job kind")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    for name, func, what in (("show", _config_show, "print the effective config as YAML (passwords masked)"),
                             ("validate", _config_validate, "check a config; exit 1 naming the bad file/key/value")):
        c = csub.add_parser(name, help=what)
        ksub = c.add_subparsers(dest="kind", metavar="KIND", required=True)
        for kind in CONFIG_KINDS:
            k = ksub.add_parser(kind, help=f"the config of `cascade {CONFIG_JOBS[kind]}`")
            k.add_argument("--config", type=Path, action="append", default=[],
                           help="YAML file" + (" (repeat to layer: dataset file, then ablations)"
                                               if _config_kinds()[kind].layered else ""))
            k.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as the job takes them")
            k.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Cascade: two-stage recommender — features, retrieval, ranking, serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_VersionAction, help="print the package version and git commit, exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        mod.register(sub)
    _register_config(sub)
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
