"""The importers on the real files in ../shared/data, and on files with injected bad rows."""
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from features.datasets import detect_kind, import_dataset, read_table
from features.schema import check_table_schema
from jobs.cli import main


def test_ml1m_counts_and_contract(shared_data, tmp_path):
    res = import_dataset(shared_data / "ml-1m", tmp_path / "ml1m")
    m = res.manifest
    assert m["stats"]["events"] == 1_000_209
    assert m["stats"]["users"] == 6_040 and m["stats"]["items"] == 3_706
    assert m["stats"]["event_types"] == {"rating": 487_650, "interaction": 512_559}
    assert m["tables"]["quarantine"]["rows"] == 0
    assert m["tables"]["items"]["rows"] == 3_883 and m["tables"]["users"]["rows"] == 6_040
    assert {s["path"].split("/")[-1] for s in m["sources"]} >= {"ml-1m.seq.txt", "movies.dat", "users.dat"}
    assert all(len(s["sha256"]) == 64 for s in m["sources"])
    ev = read_table(tmp_path / "ml1m", "events")
    check_table_schema(ev, "events")
    # event ids are unique and ordering by (ts, event_id) keeps each user's source order
    assert pc.count_distinct(ev["event_id"]).as_py() == ev.num_rows
    rated = ev.filter(pc.equal(ev["event_type"], "rating"))
    r = rated.to_pandas()
    assert r["user_id"].max() == 2999 and r["ts_ms"].min() == 970_620_734_000
    by_pos = r.sort_values(["user_id", "event_id"])
    assert (by_pos.groupby("user_id")["ts_ms"].diff().dropna() >= 0).all()  # never backwards in time
    assert float(pc.mean(rated["label"]).as_py()) == pytest.approx((170_579 + 108_545) / 487_650)


def test_ml100k_and_beauty_counts(shared_data, tmp_path):
    m = import_dataset(shared_data / "ml-100k", tmp_path / "a").manifest
    assert (m["stats"]["events"], m["stats"]["users"], m["stats"]["items"]) == (100_000, 943, 1_682)
    assert m["timestamps"] == "real"
    items = read_table(tmp_path / "a", "items").to_pylist()
    toy = next(i for i in items if i["item_id"] == 1)
    assert toy["title"].startswith("Toy Story") and "Animation" in toy["categories"]
    m = import_dataset(shared_data / "amazon-beauty" / "Beauty.txt", tmp_path / "b").manifest
    assert (m["stats"]["events"], m["stats"]["users"], m["stats"]["items"]) == (198_502, 22_363, 12_101)
    assert m["dataset"] == "beauty"


def test_bad_rows_are_quarantined_with_reasons(tmp_path):
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ratings.dat").write_text(
        "1::10::5::978300760\n"
        "1::11::3::978300761\n"
        "1::12::five::978300762\n"  # bad rating
        "2::10\n"  # field count
        "2::x::4::978300763\n"  # not an integer
        "2::13::9::978300764\n"  # out of range
        "1::10::4::978300765\n"  # duplicate
        "\n"
        "3::14::4::978300766\n"
    )
    res = import_dataset(src, tmp_path / "out", "ml-1m")
    m = res.manifest
    assert m["stats"]["events"] == 3
    assert m["tables"]["quarantine"]["by_reason"] == {
        "bad_rating": 1, "duplicate_rating": 1, "field_count": 1, "not_integer": 1, "rating_out_of_range": 1}
    q = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    assert {r["line"] for r in q} == {3, 4, 5, 6, 7}
    assert all(r["detail"] and r["raw"] for r in q)


def test_strict_exit_code_only_when_asked(tmp_path, capsys):
    seq = tmp_path / "Toy.txt"
    seq.write_text("1 5 6 7\n2 5 x\n3 8 9\n")
    assert main(["data", "import", "--source", str(seq), "--out", str(tmp_path / "o1")]) == 0
    assert "quarantined  1" in capsys.readouterr().out
    assert main(["data", "import", "--source", str(seq), "--out", str(tmp_path / "o2"), "--strict"]) == 3
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert manifest["stats"]["events"] == 5 and manifest["tables"]["quarantine"]["by_reason"] == {"not_integer": 1}


def test_existing_output_needs_overwrite(tmp_path, capsys):
    seq = tmp_path / "Toy.txt"
    seq.write_text("1 5 6\n")
    assert main(["data", "import", "--source", str(seq), "--out", str(tmp_path / "o")]) == 0
    assert main(["data", "import", "--source", str(seq), "--out", str(tmp_path / "o")]) == 1
    assert "pass --overwrite" in capsys.readouterr().err


def test_detect_kind(shared_data):
    assert detect_kind(shared_data / "ml-1m") == "ml-1m"
    assert detect_kind(shared_data / "ml-100k") == "ml-100k"
    assert detect_kind(shared_data / "amazon-beauty") == "sequence"
    with pytest.raises(FileNotFoundError):
        detect_kind(shared_data / "nope")
