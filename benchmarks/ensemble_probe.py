"""Would averaging several second-stage rankers lift the retriever further than any one of them?

A diagnostic beside `two_stage_bench.py`: it loads the ranker exports that benchmark trained on
one seed's cached lists (`<work-dir>/<dataset>/seed<S>/ranker-<tag>/export`, each with its own
inputs: context window, retriever vectors, similarities), scores the same valid and test lists
with each, and ranks every list by the retriever's logit plus the mean of the rankers'
corrections (each ranker's logit minus the retriever's), times a scale (`--scales`: 1 is the
rankers as trained, below 1 shrinks the correction toward the retriever's order, above 1 sharpens
it). Valid decides which subset and scale would be chosen; test is printed for the one chosen on valid only, beside the single rankers' test figures
from their results files. Nothing here is served: an ensemble would need a bundle with several
rankers, which the product does not have.

    python benchmarks/ensemble_probe.py --dataset ml-1m --seed 1 \\
        --tags ctx5-e60-h10 ctx5-e60-h10-uv ctx5-e60-h10-sim5 ctx5-e60-h10-uv-sim5 ctx5-e60-h10-sim5-din
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import prepare_features, print_table  # noqa: E402
from list_probe import ndcg_hr10  # noqa: E402
from results_file import write_results  # noqa: E402


def corrections(ranker: Any, store: Any, lists: Any, export: Path, chunk: int = 64) -> np.ndarray:
    """(R, N) the ranker's logit minus the retriever's over whole lists, with the ranker's own inputs."""
    from ranking.lists import ListRankingData
    from retrieval.export import load_retriever
    from retrieval.lists import attach_vectors

    cfg = ranker.cfg
    sim = max(cfg.retrieval_similarity, 0)
    if cfg.retrieval_products > 0 or sim:
        lists = attach_vectors(lists, load_retriever(export), store)
    data = ListRankingData.for_ranker(store, lists, ranker, chunk)
    lists = data.splits["valid"]
    out = []
    for s in range(0, len(lists), chunk):
        part = lists.take(np.arange(s, min(s + chunk, len(lists))))
        out.append(ranker.logits(data.batch(part)).numpy().reshape(len(part), -1) - part.logits)
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m", choices=["beauty", "ml-100k", "ml-1m"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tags", nargs="+", required=True, help="the rankers' two_stage_bench --tag values, without the leading '-'")
    p.add_argument("--work-dir", type=Path, default=REPO / "var" / "two_stage_bench")
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench")
    p.add_argument("--scales", nargs="+", type=float, default=[1.0],
                   help="multipliers of the mean correction to try on valid (1 = the rankers as trained)")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    from features.candidate_lists import CandidateLists
    from features.reader import FeatureStore
    from ranking.export import load_ranker

    work = args.work_dir / args.dataset / f"seed{args.seed}"
    store = FeatureStore(prepare_features(args.dataset, args.shared_data, args.data_dir))
    lists = {s: CandidateLists.load(sorted(work.glob(f"lists-{s}-top*.npz"))[0]) for s in ("valid", "test")}
    export = work / "retriever" / "export"  # valid and test lists come from the served retriever
    corr: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for tag in args.tags:
        ranker = load_ranker(work / f"ranker-{tag.lstrip('-')}" / "export")
        corr[tag] = {s: corrections(ranker, store, lists[s], export) for s in lists}
        print(f"  {tag}: scored in {time.perf_counter() - t0:.0f}s", flush=True)
    labels = {s: lists[s].labels() for s in lists}

    def metrics(tags: tuple[str, ...], scale: float, split: str) -> tuple[float, float]:
        scores = lists[split].logits + scale * np.mean([corr[t][split] for t in tags], axis=0)
        return ndcg_hr10(scores, labels[split])

    def name(c: tuple[tuple[str, ...], float]) -> str:
        return " + ".join(c[0]) + ("" if c[1] == 1.0 else f" (x{c[1]:g})")

    retr = {s: ndcg_hr10(lists[s].logits, labels[s]) for s in lists}
    subsets = [(c, a) for k in range(1, len(args.tags) + 1) for c in itertools.combinations(args.tags, k)
               for a in args.scales]
    valid = {c: metrics(*c, "valid") for c in subsets}
    chosen = max(subsets, key=lambda c: valid[c][0])
    test = metrics(*chosen, "test")
    rows = [["retriever alone", f"{retr['valid'][0]:.4f}", f"{retr['valid'][1]:.4f}", "", ""]]
    rows += [[name(c), f"{valid[c][0]:.4f}", f"{valid[c][1]:.4f}",
              *((f"{test[0]:.4f}", f"{test[1]:.4f}") if c == chosen else ("", ""))]
             for c in sorted(subsets, key=lambda c: -valid[c][0])[:12]]
    print_table(f"Ranker ensemble probe: {args.dataset} seed {args.seed} (mean of the corrections; top 12 on valid)",
                ["rankers", "valid ndcg@10", "valid hr@10", "test ndcg@10", "test hr@10"], rows)
    ratio = {"hr@10": test[1] / retr["test"][1], "ndcg@10": test[0] / retr["test"][0]}
    print(f"  chosen on valid: {name(chosen)}; test x retriever: hr@10 x{ratio['hr@10']:.3f}, "
          f"ndcg@10 x{ratio['ndcg@10']:.3f}")
    out = {"dataset": args.dataset, "seed": args.seed, "rankers": args.tags, "scales": args.scales,
           "retriever": {s: {"ndcg@10": v[0], "hr@10": v[1]} for s, v in retr.items()},
           "valid": {name(c): {"ndcg@10": v[0], "hr@10": v[1]} for c, v in valid.items()},
           "chosen_on_valid": list(chosen[0]), "chosen_scale": chosen[1], "test_of_chosen": {"ndcg@10": test[0], "hr@10": test[1]},
           "test_ratio_of_chosen": ratio}
    path = write_results(f"two_stage/{args.dataset}/ensemble-probe-seed{args.seed}{args.tag}", out,
                         benchmark="ensemble_probe")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
