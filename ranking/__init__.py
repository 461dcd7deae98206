"""The CTR ranker: DIN short-term attention, DARE / SDIM long-term modules, AW-MoE, task heads.

    config.py            frozen configs (RankerConfig = model + loss + data + train); YAML in configs/
    arches/embedding.py  ids -> embeddings (TorchRec collections; DARE's attention / representation tables)
    arches/sequence.py   short-term target attention; long-term full / DARE / SDIM (all via `kernels`)
    arches/moe.py        AW-MoE: experts + attention-weighted gate (one expert = a plain MLP)
    arches/heads.py      one logit per task
    model.py             RankerModel: the composition; forward(batch) -> RankerOutput
    task.py              RankerTrainTask: BCE + the contrastive gate loss; the module that is sharded
    inference.py         RankerInference: what serving calls (probabilities, SDIM behavior signatures)
    export.py            export directory (config.json + weights.pt + manifest.json) and load_ranker
    train.py             train_ranker(rank, world_size, cfg, data, out): the loop (run_distributed / torchrun)
    data.py              data sources: the shared feature reader, or batches in memory

Command line: `cascade train-ranker` (jobs/train_ranker.py). Benchmark:
benchmarks/ranking_ctr_bench.py, ranking_long_bench.py, two_stage_bench.py. Ablations are configs
(configs/ablations/*.yaml); the second stage is configs/two-stage.yaml (ranking.lists, loss.kind=listwise).
"""
