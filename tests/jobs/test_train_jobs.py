"""`cascade train-retriever` and `cascade train-ranker` take the same flags and layer their configs the same way
(jobs/training.py); the retriever's old `--nproc` still works. Parse-level, fast."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from jobs.cli import build_parser
from jobs.train_ranker import train as train_ranker
from jobs.train_retriever import load_retriever_config

REPO = Path(__file__).resolve().parents[2]


def _options(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """visible option string -> required"""
    return {o: a.required for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def _job(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_both_training_jobs_take_the_same_flags():
    retr, rank = _options(_job("train-retriever")), _options(_job("train-ranker"))
    assert set(retr) == set(rank) >= {"--features", "--config", "--out", "--world-size", "--resume", "--no-export",
                                      "--quiet"}
    assert retr["--features"] and not rank["--features"]  # the ranker falls back to data.features_dir


def test_the_retrievers_deprecated_nproc_still_sets_the_world_size():
    argv = ["train-retriever", "--features", "F", "--config", "C", "--out", "O", "train.epochs=1"]
    assert build_parser().parse_args([*argv, "--nproc", "3"]).world_size == 3
    assert build_parser().parse_args([*argv, "--world-size", "2"]).world_size == 2
    args = build_parser().parse_args(argv)
    assert args.world_size == 1 and args.config == [Path("C")] and args.overrides == ["train.epochs=1"]


def test_retriever_configs_layer_in_order_then_overrides(tmp_path):
    later = tmp_path / "longer.yaml"
    later.write_text("train:\n  epochs: 7\n  lr: 0.01\n")
    cfg = load_retriever_config([REPO / "retrieval/configs/ml-100k.yaml", later], ["train.lr=0.02"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.02  # the later file, then the override, wins
    assert cfg.model.dim == 32 and cfg.train.batch_size == 64  # the rest from the dataset file


def test_the_ranker_needs_features_from_the_flag_or_the_config(tmp_path):
    from jobs.train_ranker import load_ranker_config

    cfg = load_ranker_config([REPO / "ranking/configs/ml-100k.yaml"], ["data.features_dir="])
    with pytest.raises(ValueError, match="data.features_dir is not set: pass --features DIR"):
        train_ranker(cfg, None, tmp_path / "run")
