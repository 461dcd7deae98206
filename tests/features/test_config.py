from dataclasses import dataclass, field
from typing import Literal

import pytest

from features.config import ConfigError, dump_config, from_mapping, load_config


@dataclass(frozen=True)
class Inner:
    dim: int = 8
    kind: Literal["hnsw", "ivf"] = "hnsw"


@dataclass(frozen=True)
class Outer:
    lr: float = 1e-3
    name: str = "x"
    dims: tuple[int, ...] = (64, 32)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.01\ninner:\n  dim: 16\n")
    cfg = load_config(Outer, p, ["inner.kind=ivf", "dims=[1,2,3]", "maybe=4"])
    assert cfg == Outer(lr=0.01, dims=(1, 2, 3), inner=Inner(dim=16, kind="ivf"), maybe=4)
    assert load_config(Outer, None, [], base=cfg) == cfg
    assert "kind: ivf" in dump_config(cfg)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"lrr": 1}, r"unknown key\(s\) \['lrr'\]"),
        ({"inner": {"dim": "big"}}, "inner.dim: expected an integer, got 'big'"),
        ({"inner": {"kind": "flat"}}, "inner.kind: 'flat' is not one of"),
        ({"dims": 3}, "dims: expected a list"),
        ({"lr": True}, "lr: expected a number"),
    ],
)
def test_errors_name_the_dotted_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(Outer, data)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
