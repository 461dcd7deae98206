"""Dataset adapters: public datasets and a synthetic generator -> canonical Parquet.

`import_dataset` picks the importer from the files it finds (or `kind`).
"""
from __future__ import annotations

from pathlib import Path

from features.datasets.common import read_manifest, read_table
from features.datasets.movielens import ImportResult, MovieLensConfig, import_ml100k, import_ml1m
from features.datasets.amazon import import_sequence_file

KINDS = ("auto", "ml-1m", "ml-100k", "sequence")


def detect_kind(source: Path) -> str:
    source = Path(source)
    if source.is_file():
        return "sequence"
    if not source.is_dir():
        raise FileNotFoundError(f"dataset source {source} does not exist")
    if (source / "u.data").exists():
        return "ml-100k"
    if (source / "ml-1m.seq.txt").exists() or any(source.glob("ratings*.dat*")):
        return "ml-1m"
    txt = sorted(source.glob("*.txt"))
    if len(txt) == 1:
        return "sequence"
    raise ValueError(
        f"cannot tell the dataset format of {source}: expected u.data (ML-100K), ml-1m.seq.txt or "
        f"ratings*.dat (ML-1M), or one user-item sequence .txt file (Amazon/ICLRec); pass --kind"
    )


def import_dataset(
    source: Path,
    out: Path,
    kind: str = "auto",
    *,
    dataset: str | None = None,
    movielens: MovieLensConfig = MovieLensConfig(),
    overwrite: bool = False,
) -> ImportResult:
    source = Path(source)
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if kind == "auto":
        kind = detect_kind(source)
    if kind == "ml-1m":
        return import_ml1m(source, out, movielens, overwrite=overwrite, dataset=dataset or "ml-1m")
    if kind == "ml-100k":
        return import_ml100k(source, out, movielens, overwrite=overwrite, dataset=dataset or "ml-100k")
    path = source if source.is_file() else sorted(source.glob("*.txt"))[0]
    return import_sequence_file(path, out, dataset=dataset, overwrite=overwrite)


__all__ = [
    "ImportResult", "MovieLensConfig", "KINDS", "detect_kind", "import_dataset",
    "import_ml1m", "import_ml100k", "import_sequence_file", "read_manifest", "read_table",
]
