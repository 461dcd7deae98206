"""Build hook: compile serving/proto/*.proto at install/build time (tools/compile_protos.py).

Everything else about the distribution lives in pyproject.toml.
"""
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(ROOT / "tools" / "compile_protos.py"))["compile_protos"](ROOT)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
