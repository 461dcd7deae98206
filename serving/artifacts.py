"""The names in a pipeline artifacts directory that serving reads; `jobs/pipeline.py` writes them.

    ARTIFACTS/published.json                       the published pointer {version, bundle, checksum, ...}
    ARTIFACTS/versions/<version>/manifest.json     the version's run record (stages, inputs, metrics)
    ARTIFACTS/versions/<version>/bundle/           the model bundle (`serving.models`, its own manifest)

Defined here, the lowest layer that reads them (`serving.rebuild` resolves a snapshot
from the published version), so the writer and the readers spell them once.
"""
from __future__ import annotations

PUBLISHED = "published.json"
VERSIONS = "versions"
VERSION_MANIFEST = "manifest.json"
