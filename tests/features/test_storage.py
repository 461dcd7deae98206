"""features.storage: location parsing and confinement (pure), then every operation on a local directory and on a
real S3-compatible server (moto_server, see the `s3_server` fixture)."""
from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from features import storage
from features.storage import StorageConfig, StorageError

SEGMENT = st.text(st.sampled_from("abcxyz019-_."), min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
KEY = st.lists(SEGMENT, min_size=0, max_size=4)


# ---------------------------------------------------------------------------------------------- locations


@given(KEY, KEY)
def test_a_joined_key_is_under_its_base_and_round_trips(base, rest):
    root = "/".join(["s3://bucket", *base])
    loc = storage.join(root, *rest) if rest else root
    assert storage.check_location(loc) == loc
    assert storage.is_under(loc, root) and storage.is_under(loc + "/", root + "/")


@given(KEY, KEY, st.sampled_from(["..", ".", ""]))
def test_dot_dot_dot_and_empty_segments_are_refused(before, after, bad):
    uri = "/".join(["s3://bucket", *before, bad, *after, "x"])
    with pytest.raises(StorageError, match="segment"):
        storage.check_location(uri)


@given(KEY, SEGMENT, SEGMENT)
def test_a_sibling_prefix_is_not_under_the_root(base, name, suffix):
    root = "/".join(["s3://bucket", *base, name])
    assert not storage.is_under(root + suffix, root)  # s3://b/ab is not under s3://b/a
    assert not storage.is_under(root.replace("s3://bucket", "s3://other"), root)


@pytest.mark.parametrize("bad", ["", "  ", "http://host/x", "ftp://b/x", "s3://", "s3:///key", "s3://b/a\\..\\x",
                                 "s3://b/a\x00"])
def test_malformed_locations_are_refused_with_their_text(bad):
    with pytest.raises(StorageError):
        storage.check_location(bad, "artifacts")


def test_local_paths_and_file_uris_are_local():
    assert storage.check_location("file:///srv/art") == "/srv/art"
    assert not storage.is_remote("var/artifacts") and not storage.is_remote("file:///x")
    assert storage.is_remote("s3://b/x") and storage.is_remote("gs://b/x")


def test_join_refuses_climbing_names():
    for bad in ("..", "a/../b", "/abs", ""):
        with pytest.raises(StorageError, match="relative name"):
            storage.join("s3://b/root", bad)


# ---------------------------------------------------------------------------------------------- config


def test_config_refuses_an_inline_secret_and_half_a_key_pair():
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        StorageConfig(access_key_env="wJalrXUtnFEMI/K7MDENG+bPxRfiCY", secret_key_env="S")
    with pytest.raises(ValueError, match="go together"):
        StorageConfig(access_key_env="AWS_ACCESS_KEY_ID")
    with pytest.raises(ValueError, match="endpoint_url"):
        StorageConfig(endpoint_url="127.0.0.1:9000")


def test_options_read_credentials_by_name_and_name_a_missing_variable():
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", access_key_env="K", secret_key_env="S")
    opts = storage.s3_options(cfg, {"K": "key", "S": "secret"})
    assert opts["key"] == "key" and opts["secret"] == "secret" and opts["endpoint_url"] == "http://127.0.0.1:9000"
    assert opts["client_kwargs"] == {"region_name": "eu-west-1"}
    with pytest.raises(StorageError, match="environment variable S is not set"):
        storage.s3_options(cfg, {"K": "key"})


def test_the_config_loads_from_yaml_keys():
    from features.config import load_config

    cfg = load_config(StorageConfig, None, ["endpoint_url=http://127.0.0.1:9000", "access_key_env=MY_KEY",
                                            "secret_key_env=MY_SECRET"])
    assert cfg.access_key_env == "MY_KEY"


# ---------------------------------------------------------------------------------------------- operations


def _tree(tmp_path):
    src = tmp_path / "src"
    (src / "retriever").mkdir(parents=True)
    (src / "retriever" / "weights.pt").write_bytes(b"w" * 3000)
    (src / "manifest.json").write_text('{"version": "v1"}')
    (src / "a.txt").write_text("a")
    return src


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/artifacts"


@pytest.mark.integration
def test_write_read_exists_and_append(root):
    p = storage.join(root, "published.json")
    assert not storage.exists(p)
    storage.write_bytes_atomic(p, b'{"version": "v1"}')
    storage.write_bytes_atomic(p, b'{"version": "v2"}')
    assert json.loads(storage.read_text(p)) == {"version": "v2"} and storage.is_file(p) and storage.size(p) == 17
    h = storage.join(root, "history.jsonl")
    storage.append_line(h, '{"v": 1}')
    storage.append_line(h, '{"v": 2}\n')
    assert storage.read_text(h) == '{"v": 1}\n{"v": 2}\n'
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        storage.read_bytes(storage.join(root, "missing.json"))


@pytest.mark.integration
def test_upload_tree_lists_downloads_and_checksums(root, tmp_path):
    src = _tree(tmp_path)
    dst = storage.join(root, "versions", "v1", "bundle")
    assert storage.upload_tree(src, dst, last=("manifest.json",)) == ["a.txt", "manifest.json", "retriever/weights.pt"]
    assert storage.list_files(dst) == ["a.txt", "manifest.json", "retriever/weights.pt"]
    assert storage.list_files(storage.join(root, "nothing")) == []
    got = storage.sha256(storage.join(dst, "retriever", "weights.pt"))
    assert got == hashlib.sha256(b"w" * 3000).hexdigest()
    storage.download(storage.join(dst, "retriever", "weights.pt"), tmp_path / "copy" / "w.pt")
    assert (tmp_path / "copy" / "w.pt").read_bytes() == b"w" * 3000


def test_upload_tree_writes_the_pointer_objects_last(tmp_path, monkeypatch):
    src = _tree(tmp_path)
    order: list[str] = []
    real = storage.write_bytes_atomic
    monkeypatch.setattr(storage, "write_bytes_atomic", lambda loc, data: (order.append(loc), real(loc, data)))
    storage.upload_tree(src, str(tmp_path / "dst"), last=("manifest.json",))
    assert order[-1].endswith("manifest.json") and len(order) == 3


def test_configure_names_an_unset_credential_variable():
    cfg = StorageConfig(access_key_env="CASCADE_TEST_UNSET_KEY", secret_key_env="CASCADE_TEST_UNSET_SECRET")
    with pytest.raises(StorageError, match="CASCADE_TEST_UNSET_KEY is not set"):
        storage.configure(cfg, {})
