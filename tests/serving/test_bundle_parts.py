"""A bundle part's digest (GetModelInfo's per-model checksum, the seed of the SDIM signature spec) is computed once,
in serving.models, over that part's file entries only."""
import hashlib

from serving.models import part_digest

MANIFEST = {"retriever": {"path": "retriever"}, "ranker": {"path": "ranker/"},
            "files": {"retriever/model.pt": "aa", "retriever/config.json": "bb", "ranker/weights.pt": "cc",
                      "retriever2/x": "dd"}}


def test_a_parts_digest_covers_its_sorted_file_entries_only():
    want = hashlib.sha256(b"retriever/config.json=bbretriever/model.pt=aa").digest()
    assert part_digest(MANIFEST, "retriever") == want  # "retriever2/x" is not under "retriever/"


def test_changing_one_part_leaves_the_other_parts_digest():
    changed = {**MANIFEST, "files": {**MANIFEST["files"], "ranker/weights.pt": "ee"}}
    assert part_digest(changed, "retriever") == part_digest(MANIFEST, "retriever")
    assert part_digest(changed, "ranker") != part_digest(MANIFEST, "ranker")
