"""Training machinery shared by the retriever and the ranker (one implementation, not two):
the training-loop skeleton (data contract, result type, lock-step collectives; loop.py),
sharding (TorchRec DistributedModelParallel, planner constraints, fused optimizers),
DCP checkpoints, a loopback process launcher, metrics and per-epoch reports.

It lives in `features` because both `retrieval` and `ranking` need it and they
may not import each other (import layering in pyproject.toml).
"""
