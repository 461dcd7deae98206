"""The offline half of Cascade: PySpark feature jobs (the only package that imports pyspark).

    features.spark.session    the Spark session (`local[*]` or any --master)
    features.spark.config     typed job configuration
    features.spark.pipeline   `build_features`: all jobs, or any subset, into a features directory
    features.spark.events     validation, quarantine, dedup, per-event enrichment
    features.spark.tables     item / user feature tables
    features.spark.sequences  timelines and capped sequences
    features.spark.stats      as-of and latest windowed counters
    features.spark.samples    splits, ranking samples (sampled negatives), popularity, retrieval samples
    features.spark.report     the validation report
    features.spark.exprs      JVM expressions of the contract's hash / action / category functions

The output layout is documented in `features.layout`; `features.reader` turns
it into batches. Work stays in the JVM (DataFrame API, window functions,
sorted collect_list, array slicing): no Python UDFs, nothing collected to the
driver but aggregates.
"""
