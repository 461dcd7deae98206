"""The second stage's training recipe: one for the scheduled pipeline and for the two-stage benchmark.

A second-stage ranker (`ranking.config.ModelConfig.residual_column` >= 0) scores the served retriever's
top-N list of each request as the retriever's logit plus a learned correction. What it learns from
(`ranking.config.ListsConfig`):

* training lists: the top-N lists of a second retriever, the same config trained with
  ``train.holdout_tail = lists.holdout``, at each user's last `holdout` training positions — targets that
  retriever never trained on, so its logit is as sharp in training as the served retriever's is at
  serving (lists at positions the retriever trained on make its score look far better than it is);
* valid lists: the served retriever at the validation position (it never trained on that item): the
  ranker's epoch is chosen on their NDCG@10, which is the two-stage system's valid NDCG@10;
* test lists: the served retriever at the test position, reported once;
* the point-in-time context counts (`features.list_context`) over every user's retrieval-training prefix,
  exported with the ranker (`context.npz`) so the server computes the same features;
* with `lists.retriever_vectors` or `lists.retriever_similarity`, each list's retriever vectors
  (`retrieval.lists.attach_vectors`): the holdout retriever's for the training lists, the served one's for
  valid and test, as the server uses its own;
* with `lists.item_item`, an item-item model (`features.item_item.ItemItem`) per lists retriever, fitted on
  exactly what it trained on (each user's timeline before the holdout positions for the training lists, the
  retrieval-training prefix for valid and test), the served one exported with the ranker (`item_item.npz`);
  with `lists.item_item_select` as well, a ranker without them is trained too and the one better on the valid
  lists is kept (`fit_selected`).

Every list is the top N of every item the user has not seen. Lists are cached as ``.npz`` under the run's
directory, so a resumed run does not retrieve again.

    lists = candidate_lists(store, retriever_export, lists_retriever_export, cfg.lists, cache_dir=out / "lists")
    kept = fit_selected(cfg, store, lists, out)  # the ranker (or, with lists.item_item_select, the better of two)
    kept = train_second_stage(cfg, features_dir, retriever_export, lists_retriever_export, out)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

SPLITS = ("train", "valid", "test")


def list_requests(store: Any, lc: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (user_ids, hist_len)} of the requests whose lists the second stage reads (module docstring)."""
    tl = store.retrieval_train_len
    users = store.timeline_users.ids
    ok = np.flatnonzero(tl >= 1)
    if lc.max_users:
        ok = ok[:lc.max_users]
    k = lc.holdout
    fit = ok[tl[ok] - k >= 1]  # each training request sees >= 1 behavior
    return {"train": (np.repeat(users[fit], k), (tl[fit, None] - k + np.arange(k)).ravel()),
            "valid": (users[ok], tl[ok]),
            "test": (users[ok], tl[ok] + 1)}


def candidate_lists(store: Any, retriever: Path, lists_retriever: Path, lc: Any, cache_dir: Path | None = None,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """{train, valid, test} `CandidateLists`: training lists from `lists_retriever` (the holdout one), valid and
    test lists from `retriever` (the served one); cached under `cache_dir` when given."""
    from features.candidate_lists import CandidateLists
    from retrieval.export import load_retriever
    from retrieval.lists import attach_vectors, retrieve_lists

    exports = {"train": Path(lists_retriever), "valid": Path(retriever), "test": Path(retriever)}
    out, loaded = {}, {}
    for split, (users, hist) in list_requests(store, lc).items():
        path = None if cache_dir is None else Path(cache_dir) / f"lists-{split}-top{lc.top_n}.npz"
        export = exports[split]
        if path is not None and path.exists():
            out[split] = CandidateLists.load(path)
            # the item lookup is not cached; the user vectors are, unless the cache predates them
            if lc.retriever_vectors or lc.retriever_similarity:
                if export not in loaded:
                    loaded[export] = load_retriever(export)
                out[split] = attach_vectors(out[split], loaded[export], store)
            continue
        if export not in loaded:
            loaded[export] = load_retriever(export)
        t0 = time.perf_counter()
        out[split] = retrieve_lists(loaded[export], store, users, hist, lc.top_n)  # the export's logit scale
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            out[split].save(path)
        say(f"    {split}: {len(users):,} lists of {lc.top_n} in {time.perf_counter() - t0:.0f}s, "
            f"retriever recall@{lc.top_n} {out[split].hit().mean():.3f}")
    return out


def fit_item_item(store: Any, lc: Any, say: Callable[[str], None] = print) -> dict[str, Any]:
    """{split: ItemItem} fitted on what each split's lists retriever trained on: the holdout retriever's timeline
    prefixes (before each user's last `lc.holdout` training behaviors) for train, the served retriever's
    (the retrieval-training prefix) for valid and test."""
    from features.item_item import ItemItem

    offsets, items = np.asarray(store.timeline_offsets)[:-1], store.timeline_values["item_id"]
    out = {}
    for name, visible in (("lists", store.retrieval_train_ends(lc.holdout)), ("served", store.retrieval_train_ends())):
        t0 = time.perf_counter()
        out[name] = ItemItem.fit(offsets, items, visible, lam=lc.item_item_lambda, k=lc.item_item_k)
        say(f"    item-item ({name} retriever's prefixes): {len(out[name].item_ids):,} items, k {out[name].k}, "
            f"lambda {lc.item_item_lambda:g}, {time.perf_counter() - t0:.0f}s")
    return {"train": out["lists"], "valid": out["served"], "test": out["served"]}


def list_data(store: Any, lists: dict[str, Any], cfg: Any, say: Callable[[str], None] = print) -> Any:
    """The ranker's `ListRankingData` over `lists`, with the context counts when `cfg.lists.context_window` > 0 and
    the item-item models with `cfg.lists.item_item`."""
    from ranking.lists import ListRankingData

    lc = cfg.lists
    context = ListRankingData.context_counts(store, lc.context_window) if lc.context_window else None
    if lc.item_item:
        models = fit_item_item(store, lc, say)
        lists = {split: lst.with_item_item(models[split]) for split, lst in lists.items()}
    return ListRankingData(store, lists, history_cap=cfg.model.sequence.history_len,
                           lists_per_batch=lc.lists_per_batch, seed=cfg.train.seed, train_width=lc.train_width,
                           context=context, retriever_vectors=lc.retriever_vectors,
                           retriever_similarity=lc.retriever_similarity,
                           item_item_history=lc.item_item_history if lc.item_item else 0)


@dataclass
class SecondStageFit:
    """What `fit_selected` kept: the ranker's TrainResult and the ListRankingData it reads, and a record of every
    ranker the run trained ({name: {"valid", "test", "best_epoch", "export"}}; "" when it trained one)."""

    result: Any
    data: Any
    kept: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


def ranker_variants(cfg: Any) -> dict[str, Any]:
    """{name: config} of the rankers a second-stage run trains: `cfg` alone (name ""), or with
    `lists.item_item_select` the ranker without the item-item inputs and the one with them, in that order."""
    lc = cfg.lists
    if not (lc.item_item and lc.item_item_select):
        return {"": cfg}
    without = dataclasses.replace(cfg, lists=dataclasses.replace(lc, item_item=False, item_item_select=False))
    return {"no-item-item": without, "item-item": cfg}


def fit_selected(cfg: Any, store: Any, lists: dict[str, Any], out: Path,
                 say: Callable[[str], None] = print) -> SecondStageFit:
    """Trains each of `ranker_variants(cfg)` on `lists` (a single one into OUT, else each into OUT/<name>) and keeps
    the one best on the valid lists' `train.select_metric`; a later variant must beat the earlier strictly, so a tie
    keeps the ranker without the item-item inputs. Only validation decides; the test figures are recorded."""
    from features.train.loop import improves

    metric = cfg.train.select_metric
    kept: SecondStageFit | None = None
    variants: dict[str, dict[str, Any]] = {}
    for name, vcfg in ranker_variants(cfg).items():
        data = list_data(store, lists, vcfg, say)
        say(f"    ranker{f' ({name})' if name else ''}: {len(data.splits['train']):,} training lists holding their "
            f"target (of {len(lists['train']):,}), width {vcfg.lists.train_width or vcfg.lists.top_n}, "
            f"context window {vcfg.lists.context_window}")
        res = fit(vcfg, data, Path(out) / name if name else Path(out))
        variants[name] = {"valid": res.best_valid, "test": res.test, "best_epoch": res.best_epoch,
                          "export": res.export_dir}
        if kept is None or improves(metric, res.best_valid[metric], kept.result.best_valid[metric]):
            kept = SecondStageFit(result=res, data=data, kept=name)
    assert kept is not None
    kept.variants = variants
    if len(variants) > 1:
        say(f"    kept the ranker {kept.kept!r} on valid {metric}: "
            + ", ".join(f"{n} {v['valid'][metric]:.4f}" for n, v in variants.items()))
    return kept


def _train(rank: int, world: int, cfg: Any, data: Any, out: str) -> Any:
    from ranking.train import train_ranker

    return train_ranker(rank, world, cfg, data, out)


def fit(cfg: Any, data: Any, out: Path) -> Any:
    """The listwise ranker on `data` (one rank: the lists are in memory) into `out`; -> its TrainResult."""
    from features.train.launch import run_distributed

    check_second_stage(cfg)
    return run_distributed(_train, 1, cfg, data, str(out))[0]


def check_second_stage(cfg: Any) -> None:
    if cfg.model.residual_column < 0:
        raise ValueError("not a second-stage ranker config: set model.residual_column (e.g. layer "
                         "ranking/configs/two-stage.yaml)")
    if cfg.loss.kind != "listwise":
        raise ValueError(f"a second-stage ranker trains listwise over its lists: loss.kind={cfg.loss.kind!r}")


def train_second_stage(cfg: Any, features: Path, retriever: Path, lists_retriever: Path, out: Path,
                       say: Callable[[str], None] = print) -> SecondStageFit:
    """Lists (cached under OUT/lists), then the listwise ranker(s) into OUT (checkpoints, export with its context
    counts; `fit_selected`); its `result` is the kept ranker's `ranking.train.TrainResult` (best valid = the
    two-stage valid metrics, test at that epoch)."""
    from features.reader import FeatureStore

    check_second_stage(cfg)
    out = Path(out)
    store = FeatureStore(Path(features))
    lists = candidate_lists(store, retriever, lists_retriever, cfg.lists, out / "lists", say)
    return fit_selected(cfg, store, lists, out, say)
