"""The gRPC ranking server: Redis online state fed from Kafka, hot-swapped models, Prometheus metrics.

Split by responsibility (DESIGN.md, STYLE.md practice 12):

    app.py          composition root: config (YAML <- env <- --set), wiring, graceful SIGTERM
    config.py       the frozen `ServingConfig` tree
    servicer.py     proto <-> runtime types only (`cascade.v1.Ranking`: Rank, GetModelInfo)
    runtime.py      a request -> scores (no grpc): stages, deadlines, degraded answers
    batching.py     online state -> the project's one `Batch` (the serving side of the reader)
    interceptors.py load shedding, metrics, domain error -> gRPC status (once)
    errors.py       domain errors carrying their gRPC status
    health.py       grpc.health.v1: live / ready (can answer, maybe degraded) / full (all dependencies)
    metrics.py      every Prometheus metric, declared once (`METRIC_NAMES`)
    models.py       the model-bundle boundary: manifest, checksums, restricted loaders, `ModelHolder`
                    (bundles hold `retrieval.export` + `ranking.export` exports; no model code lives here)
    lifecycle.py    validate + smoke-test + swap a bundle; new items into the catalog and index
    index.py        the served ANN index: the retriever's plus a delta of items added since export
    catalog.py      the in-memory item catalog (attributes, id -> row)
    state/          the online-store interface, its Redis implementation, the packed layout, transitions
    stream/         Kafka consumers: events (group, idempotent), items and models (broadcast), dead letters
    bootstrap.py    bulk-load the online state from a canonical dataset
    replay.py       produce a dataset's events to Kafka at a rate (`cascade events replay`)
    proto/          ranking.proto (compiled at install time by tools/compile_protos.py)
"""
