"""`cascade.v1.Ranking`: proto <-> runtime types, nothing else.

Errors are domain exceptions (`serving.errors`) raised by the runtime and
mapped to gRPC statuses once, in `serving.interceptors`.
"""
from __future__ import annotations

import os
from typing import Any

from serving.models import ModelHolder, part_digest
from serving.proto import ranking_pb2, ranking_pb2_grpc
from serving.runtime import CatalogRef, Deadline, RankQuery, Runtime

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["Ranking"].full_name  # "cascade.v1.Ranking"


def query_from_proto(req: ranking_pb2.RankRequest) -> RankQuery:
    return RankQuery(
        user_id=req.user_id, k=req.k, num_candidates=req.num_candidates, context=dict(req.context),
        exclude_seen=req.exclude_seen, debug=req.debug, candidate_item_ids=tuple(req.candidate_item_ids),
        as_of_ms=req.as_of_ms,
    )


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, runtime: Runtime, models: ModelHolder, catalog: CatalogRef, default_deadline_s: float) -> None:
        self.runtime = runtime
        self.models = models
        self.catalog = catalog
        self.default_deadline_s = default_deadline_s

    def Rank(self, request: ranking_pb2.RankRequest, context: Any) -> ranking_pb2.RankResponse:
        remaining = context.time_remaining()
        deadline = Deadline.after(remaining if remaining is not None else self.default_deadline_s)
        r = self.runtime.rank(query_from_proto(request), deadline)
        resp = ranking_pb2.RankResponse(
            model_version=r.model_version, fallback_reason=r.fallback_reason, history_length=r.history_length,
            candidates_considered=r.candidates_considered,
        )
        items = resp.items
        for i, s, rs in zip(r.item_ids.tolist(), r.scores.tolist(), r.retrieval_scores.tolist()):
            items.add(item_id=i, score=s, retrieval_score=rs)
        if request.debug:
            for stage, sec in r.timings:
                resp.timings.add(stage=stage, seconds=sec)
        return resp

    def GetModelInfo(self, request: ranking_pb2.GetModelInfoRequest, context: Any) -> ranking_pb2.ModelInfo:
        b = self.models.current
        if b is None:
            return ranking_pb2.ModelInfo()
        return ranking_pb2.ModelInfo(
            model_version=b.version, retriever_checksum=part_digest(b.manifest, "retriever").hex(),
            ranker_checksum=part_digest(b.manifest, "ranker").hex(),
            loaded_at_ms=int(b.loaded_at * 1000), num_items=len(b.index), index_type=type(b.retriever).__name__,
            metadata={"bundle_checksum": b.checksum, "path": str(b.path), "sdim": "yes" if b.sig_spec else "no",
                      "pid": str(os.getpid()),
                      "catalog_items": str(len(self.catalog.current)),
                      "retriever_loader": str(b.manifest["retriever"]["loader"]),
                      "ranker_loader": str(b.manifest["ranker"]["loader"])},
        )
