"""The chart's README: its values table is what readme.py generates from values.yaml, and it says what was
validated and how."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "cascade"


def _readme_module():
    spec = importlib.util.spec_from_file_location("chart_readme", CHART / "readme.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_values_table_is_up_to_date() -> None:
    mod = _readme_module()
    current = (CHART / "README.md").read_text()
    assert mod.render(current, (CHART / "values.yaml").read_text()) == current, \
        "helm/cascade/README.md is out of date: run python helm/cascade/readme.py"


def test_every_documented_value_is_a_row_with_its_default() -> None:
    mod = _readme_module()
    text = (CHART / "values.yaml").read_text()
    rows = {r.key: r for r in mod.documented_values(text)}
    assert len(rows) == text.count("# -- ")
    assert rows["pipeline.features.keepVersions"].default == "3"
    assert rows["server.ports.grpc"].type == "int"
    assert rows["kafka.sasl.existingSecret"].description.startswith("Name of an existing Secret")


def test_the_generator_documents_nested_keys_with_multiline_descriptions() -> None:
    mod = _readme_module()
    text = "a:\n  # -- first line\n  # second line\n  b: {c: 1}\n  # plain comment\n  d: 2\n"
    (row,) = mod.documented_values(text)
    assert (row.key, row.type, row.default, row.description) == ("a.b", "object", '{"c": 1}', "first line second line")
    assert yaml.safe_load(text)["a"]["b"] == {"c": 1}


def test_the_readme_says_what_was_validated_and_what_could_not_be() -> None:
    readme = (CHART / "README.md").read_text()
    for test in ("test_chart.py", "test_chart_operators.py", "test_chart_monitoring.py", "test_prometheus_live.py",
                 "test_dockerfile.py"):
        assert test in readme and (CHART.parents[1] / "tests" / "helm" / test).is_file()
    assert "A real cluster deployment could not be done" in readme
