"""Import layering (features <- kernels <- retrieval | ranking <- serving <- jobs; only
features.spark imports pyspark), checked with import-linter's contracts in pyproject.toml."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken" in proc.stdout


def test_every_top_level_package_imports():
    for pkg in ("features", "kernels", "retrieval", "ranking", "serving", "jobs"):
        __import__(pkg)
