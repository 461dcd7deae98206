"""`cascade build-features` end to end: outputs, manifest, report, partial builds, clear errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import layout
from features.schema import SchemaError

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration


def test_ml100k_build_writes_every_output_and_a_manifest(ml100k_features, ml100k_dataset):
    m = json.loads((ml100k_features / layout.MANIFEST).read_text())
    assert (m["feature_set_version"], m["schema_version"], m["hash_spec_version"]) == (1, "1", 1)
    assert len(m["config_sha256"]) == 64 and len(m["input"]["sha256"]) == 64 and m["input"]["files"] == 3
    assert m["input"]["dataset"] == "ml-100k" and m["input"]["tables"]["events"] == 100_000
    assert set(m["timings_s"]) == {"events", "items", "users", "timelines", "sequences", "popularity",
                                   "retrieval_samples", "ranking_samples", "stats", "report"}
    for output in layout.OUTPUTS:
        assert (ml100k_features / output).is_dir(), output
        assert output in m["outputs"]
    rows = {k: v["rows"] for k, v in m["outputs"].items()}
    assert rows[layout.TIMELINES] == {"rows": 943} and rows[layout.ITEMS] == {"rows": 1682}
    assert sum(rows[layout.RETRIEVAL_SAMPLES].values()) == 100_000 - 943  # every behavior but each user's first
    assert rows[layout.RETRIEVAL_SAMPLES]["test"] == rows[layout.RETRIEVAL_SAMPLES]["valid"] == 943
    for name, r in rows.items():  # the observed counts are the files' counts
        if name in (layout.REPORT,):
            continue
        assert sum(r.values()) == pq.read_table(ml100k_features / name).num_rows, name
    assert m["time_range"]["min_ts_ms"] == 874_724_710_000 and m["time_range"]["max_ts_ms"] == 893_286_638_000
    r = m["splits"]["ranking"]
    assert m["time_range"]["min_ts_ms"] < r["valid_start_ms"] < r["test_start_ms"] < m["time_range"]["max_ts_ms"]
    assert 0.5 < m["dense"]["prior_rate"] < 0.6  # share of ratings >= 4 in the training window
    assert m["tables"]["users"]["attribute_keys"] == ["age", "gender", "occupation", "zip3"]


def test_validation_report(ml100k_features):
    rep = json.loads((ml100k_features / "report" / "validation.json").read_text())
    assert rep["input"]["events"] == rep["input"]["valid_events"] == 100_000
    assert rep["input"]["quarantined"]["total"] == 0 and rep["input"]["out_of_order_events"] == 0
    assert rep["input"]["nulls"]["context"] == 100_000 and rep["input"]["nulls"]["user_id"] == 0
    sl = rep["sequence_length"]
    assert (sl["users"], sl["min"], sl["max"]) == (943, 20, 737)
    assert sum(b["count"] for b in sl["histogram_log2"]) == 943
    assert rep["coverage"]["items"]["share"] == 1.0
    assert rep["hash_buckets"]["item_id"]["distinct_ids"] == 1682
    assert rep["ranking_samples"]["splits"]["train"]["positive_rate"] == pytest.approx(0.55, abs=0.02)
    assert rep["warnings"] == []
    text = (ml100k_features / "report" / "validation.txt").read_text()
    assert "sequence length" in text and "hash buckets" in text
    assert (ml100k_features / "report" / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_small_report_flags_the_problems(small_features):
    rep = json.loads((small_features / "report" / "validation.json").read_text())
    assert rep["input"]["quarantined"]["by_reason"]["duplicate_event_id"] == 1
    assert rep["input"]["out_of_order_events"] >= 1
    assert rep["coverage"]["items"]["events_with_unknown_id"] == 1  # item 90099
    assert rep["coverage"]["users"]["in_table"] < rep["coverage"]["users"]["ids_in_events"]  # 9004, 9005
    joined = " ".join(rep["warnings"])
    assert "quarantined" in joined and "out of order" not in joined and "later in the input" in joined
    assert "missing from the items table" in joined


def test_partial_builds_need_the_same_config_and_input(spark, small_dataset, small_features, small_config, tmp_path):
    from features.spark.config import FeatureBuildConfig
    from features.spark.pipeline import build_features
    from dataclasses import replace

    out = tmp_path / "features"
    shutil.copytree(small_features, out)
    before = json.loads((out / layout.MANIFEST).read_text())
    res = build_features(spark, small_dataset, out, small_config, only=("sequences",))
    assert [s.name for s in res.stages] == ["sequences"]
    after = json.loads((out / layout.MANIFEST).read_text())
    assert after["outputs"][layout.SEQUENCES] == before["outputs"][layout.SEQUENCES]
    assert after["config_sha256"] == before["config_sha256"]
    other = replace(small_config, sequence=replace(small_config.sequence, long_cap=5))
    with pytest.raises(ValueError, match="another configuration"):
        build_features(spark, small_dataset, out, other, only=("sequences",))
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_features(spark, small_dataset, out, small_config)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['sequence'\]"):
        build_features(spark, small_dataset, out, small_config, only=("sequence",))
    assert isinstance(FeatureBuildConfig(), FeatureBuildConfig)


def test_bad_inputs_fail_with_clear_errors(spark, small_dataset, tmp_path):
    from features.spark.pipeline import build_features

    with pytest.raises(FileNotFoundError, match="canonical dataset"):
        build_features(spark, tmp_path / "nope", tmp_path / "out")
    bad = tmp_path / "bad"
    shutil.copytree(small_dataset, bad)
    t = pq.read_table(bad / "events")
    t = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array([str(x) for x in t["user_id"].to_pylist()]))
    shutil.rmtree(bad / "events")
    (bad / "events").mkdir()
    pq.write_table(t, bad / "events" / "part-0.parquet")
    with pytest.raises(SchemaError, match="column 'user_id' has type string, expected bigint"):
        build_features(spark, bad, tmp_path / "out2", only=("events",))


def test_cli_reports_errors_in_one_line(capsys, tmp_path):
    from jobs.cli import main

    rc = main(["build-features", "--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "--only", "sequencez"])
    assert rc == 1
    assert "unknown stage(s) ['sequencez']" in capsys.readouterr().err
    rc = main(["build-features", "--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "sequence.long_cap=x"])
    assert rc == 1 and "sequence.long_cap: expected an integer" in capsys.readouterr().err


def test_job_file_is_spark_submit_ready():
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "build_features.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--dataset" in proc.stdout and "--master" in proc.stdout
    import jobs.build_features as job

    assert "spark-submit --master yarn" in job.__doc__ and "cascade build-features --dataset" in job.__doc__
