"""The Spark session of the feature jobs: `local[*]` by default, any `--master` unchanged.

* ``master`` defaults to ``local[*]``; ``None`` leaves it to spark-submit
  (``--master yarn``, ``k8s://...``, ``spark://...``), which is what
  `jobs/build_features.py` passes when spark-submit launched it.
* The UI is off and the driver binds to 127.0.0.1 in local mode, so nothing
  listens beyond loopback; on a cluster the driver address is the cluster's
  business (spark-submit / spark-defaults.conf), so it is left alone.
* Timestamps are interpreted in UTC; logs are quiet (`SparkConfig.log_level`).
* Local mode starts the JVM with `SparkConfig.driver_memory` and
  `driver_java_options` (e.g. C1-only JIT for tiny inputs, as the tests do).
* A session that is already running (a test's, a notebook's) is reused as is
  and never stopped by the jobs: `owned` says whether the caller started it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from pyspark.sql import SparkSession

from features.spark.config import SparkConfig


@dataclass
class SessionHandle:
    spark: SparkSession
    owned: bool  # True if this call started the session (then the caller stops it)

    def stop(self) -> None:
        if self.owned:
            self.spark.stop()


def build_session(cfg: SparkConfig = SparkConfig()) -> SessionHandle:
    """Starts (or reuses) the Spark session described by `cfg`."""
    active = SparkSession.getActiveSession()
    if active is not None:
        active.sparkContext.setLogLevel(cfg.log_level.upper())
        return SessionHandle(active, owned=False)
    builder = SparkSession.builder.appName(cfg.app_name)
    if cfg.master is not None:
        builder = builder.master(cfg.master)
    settings = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.adaptive.enabled": "true",
        "spark.serializer": "org.apache.spark.serializer.KryoSerializer",
        "spark.sql.parquet.compression.codec": "zstd",
    }
    if cfg.master is not None and cfg.master.startswith("local"):
        settings.update({
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.driver.host": "127.0.0.1",
            "spark.driver.memory": cfg.driver_memory,
        })
        if cfg.driver_java_options:
            settings["spark.driver.extraJavaOptions"] = cfg.driver_java_options
    settings.update(cfg.conf)
    for k, v in settings.items():
        builder = builder.config(k, v)
    with warnings.catch_warnings():
        # pyspark warns about the pandas version at import of its testing utils; we do not use pandas in Spark.
        warnings.filterwarnings("ignore", message=".*PySpark does not yet fully support pandas.*")
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level.upper())
    return SessionHandle(spark, owned=True)
