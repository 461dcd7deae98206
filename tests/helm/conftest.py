"""Rendering the chart offline: helm-python-sdk (Helm v4's Go SDK through ctypes; no helm binary, no cluster)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "cascade"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "cascade", "recsys"



class Rendered(list):
    """The Kubernetes objects of one render, in template order."""

    def find(self, kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
        return [d for d in self if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = self.find(kind, name_suffix)
        names = [d["metadata"]["name"] for d in found]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {names}"
        return found[0]

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self}


def scenario_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) or {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `scenario` runs once per ci/*-values.yaml file (default, full, minimal)."""
    if "scenario" in metafunc.fixturenames:
        metafunc.parametrize("scenario", SCENARIOS)


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART


@pytest.fixture(scope="session")
def values_of() -> Callable[[str], dict[str, Any]]:
    """scenario name -> its values (a fresh copy)."""
    return scenario_values


@pytest.fixture(scope="session")
def chart():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a dev dependency: pip install -e .[dev]")
    return helm.Chart.load(CHART)


@pytest.fixture(scope="session")
def render_files(chart) -> Callable[..., dict[str, str]]:
    """values -> {template path: rendered text}, like `helm template` (empty outputs dropped)."""

    def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
        out = chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)
        return {path: text for path, text in out.items() if text.strip()}

    return render


@pytest.fixture(scope="session")
def render(render_files) -> Callable[..., Rendered]:
    """values -> the rendered Kubernetes objects (NOTES.txt left out)."""

    def render_docs(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> Rendered:
        files = render_files(values, namespace)
        return Rendered(doc for path, text in sorted(files.items()) if not path.endswith("NOTES.txt")
                        for doc in yaml.safe_load_all(text) if doc)

    return render_docs


@pytest.fixture(scope="session")
def scenarios(render) -> dict[str, Rendered]:
    """Every ci/*-values.yaml scenario, rendered once per session."""
    return {name: render(scenario_values(name)) for name in SCENARIOS}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install it with `apt-get install prometheus` (make sysdeps does)")
    return path
