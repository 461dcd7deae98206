"""How much of the second stage's lift do its dense list features carry, and would more of them help?

A diagnostic beside `two_stage_bench.py`: on the candidate lists that benchmark cached
(`<work-dir>/<dataset>/seed<S>/lists-*.npz`, the same lists the ranker trained and was
selected on), it fits small listwise models over per-candidate dense features only — a
linear model and a one-hidden-layer MLP, each as a correction added to the retriever's
logit and starting at zero, the ranker's own residual form, trained by softmax
cross-entropy over each whole training list — and reports the valid lists' NDCG@10 /
HR@10 at the best of a few epochs (validation only: this chooses what to build, so the
test lists are not read).

Feature sets:
  list+context  the ranker's candidate_dense (`features.list_context.second_stage_dense`:
                retriever logit, log rank, gap to the top; point-in-time item count,
                item age, transitions, co-occurrence and category share over the last
                `--window` behaviors)
  +time windows behaviors on the candidate in the last 24 h / 7 d / 30 d before the
                request (point in time, from the same counts), candidates for new features
  +wide cooc    co-occurrence and category share over the last 10 and 20 behaviors
                (the product's features at `lists.context_window` = 10 / 20)
  all           both
  +retriever u*v  the retriever's per-dimension logit terms u_d * v_d x logit_scale (D columns,
                summing to the logit), from the lists' own exports (`retriever-holdout` for the
                training lists, `retriever` for the valid ones): does the ranker gain from the
                retriever's vectors, not only its score? (skipped with --no-vectors)
  +retriever sims  cosine similarity in the retriever's item space of the candidate to the
                request's last behavior, and its max and mean over the last 5 (basis-free)
  +ease         a second, differently built model's opinion: EASE, an item-item ridge regression in
                closed form (`features.item_item.ItemItem`; `--ease-lambda`, `--ease-k`), fitted on
                what the lists' retriever trained on (each user's timeline before their first
                training list for the training lists, before the valid target for the valid ones);
                its score of the candidate from the request's history (`--ease-history`), and that
                score's gap to the list's best (`--ease`)

Compare its best with the full ranker's valid NDCG@10 in the two-stage results file (pass
`--ranker-results`): the gap is what the ranker's sequence modules add beyond the dense
features.

    python benchmarks/list_probe.py --dataset ml-1m --seed 0 \\
        --ranker-results benchmarks/results/two_stage/ml-1m/seed0-ctx5-e60-h10.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import prepare_features, print_table  # noqa: E402
from results_file import write_results  # noqa: E402

WINDOWS_H = (24, 24 * 7, 24 * 30)
WIDE = (10, 20)
TS_SHIFT = 41  # item index * 2**41 + ts_ms: a sortable (item, time) key for ms timestamps before year 2039


def build_features(store: Any, lists: Any, window: int) -> tuple[np.ndarray, list[str]]:
    """(R, N, F) float32 features of every candidate of `lists`, and their names: the ranker's candidate_dense
    as training builds it (`ListRankingData.candidate_dense`), then the candidate features."""
    from features.candidate_lists import LIST_FEATURE_NAMES
    from features.list_context import CONTEXT_FEATURE_NAMES, recent_items
    from ranking.lists import ListRankingData

    ctx = ListRankingData.context_counts(store, window)
    data = ListRankingData(store, {"train": lists, "valid": lists, "test": lists}, history_cap=1, lists_per_batch=1,
                           context=ctx)
    base, req_ts = data.candidate_dense(lists)
    _, pts = data.request_times(lists)
    cols, names = [base], [*LIST_FEATURE_NAMES, *CONTEXT_FEATURE_NAMES]
    r, n = lists.items.shape
    # windowed counts: events on the candidate before the request's point and within the window before its time
    c_idx, found = ctx.item_index(lists.items)
    hi = np.searchsorted(ctx.item_keys, c_idx * ctx.horizon + np.repeat(pts, n).reshape(r, n))
    ts_keys = (ctx.item_keys // ctx.horizon) * (1 << TS_SHIFT) + ctx.item_ts
    for w in WINDOWS_H:
        lo = np.searchsorted(ts_keys, c_idx * (1 << TS_SHIFT) + (req_ts[:, None] - int(w * 3.6e6)))
        cols.append(np.log1p(np.where(found, np.maximum(hi - lo, 0), 0)).reshape(-1, 1).astype(np.float32))
        names.append(f"log_item_count_{w}h")
    rows, _ = store.timeline_users.rows(lists.user_ids)
    for wide in WIDE:
        c2 = ListRankingData.context_counts(store, wide)
        recent = recent_items(store.timeline_offsets, store.timeline_values["item_id"], rows, lists.hist_len, wide)
        f2 = c2.features(recent, lists.hist_len, pts, req_ts, lists.items)
        for name in ("log_cooccurrence", "category_share"):
            cols.append(f2[:, [CONTEXT_FEATURE_NAMES.index(name)]])
            names.append(f"{name}_{wide}")
    return np.concatenate(cols, 1).reshape(r, n, -1), names


SIM_RECENT = 5  # recent behaviors the retriever-space similarities read
SIM_NAMES = ("retriever_sim_last", f"retriever_sim_max{SIM_RECENT}", f"retriever_sim_mean{SIM_RECENT}")  # as probed


def retriever_features(store: Any, lists: Any, export: Path) -> tuple[np.ndarray, np.ndarray]:
    """From the export that made `lists`: (R, N, D) their `retrieval_products` and (R, N, 3) their
    `retrieval_similarities` to the last `SIM_RECENT` behaviors, as the ranker reads them with
    `lists.retriever_vectors` / `lists.retriever_similarity` (`retrieval.lists.attach_vectors`)."""
    from features.list_context import recent_items
    from retrieval.export import load_retriever
    from retrieval.lists import attach_vectors

    withv = attach_vectors(lists, load_retriever(export), store)
    rows, _ = store.timeline_users.rows(lists.user_ids)
    recent = recent_items(store.timeline_offsets, store.timeline_values["item_id"], rows, lists.hist_len, SIM_RECENT)
    shape = (len(lists), lists.width, -1)
    return withv.products().reshape(shape), withv.similarities(recent).reshape(shape)


def ease_features(store: Any, lists: Any, fit_lists: Any, lam: float, k: int, history: int,
                  chunk: int = 2048) -> np.ndarray:
    """(R, N, 2) the `features.item_item.ItemItem` score of every candidate of `lists` from its request's last
    `history` behaviors (0: all), and the score minus the list's best; the model fitted on each user's timeline
    before the first of the user's `fit_lists` (what that list's retriever trained on)."""
    from features.item_item import ItemItem
    from features.list_context import recent_items

    users, inv = np.unique(fit_lists.user_ids, return_inverse=True)
    first = np.full(len(users), np.iinfo(np.int64).max)
    np.minimum.at(first, inv, fit_lists.hist_len)
    user_rows, _ = store.timeline_users.rows(users)
    values = store.timeline_values["item_id"]
    model = ItemItem.fit(np.asarray(store.timeline_offsets)[user_rows], values, first, lam=lam, k=k)
    rows, _ = store.timeline_users.rows(lists.user_ids)
    out = np.zeros((len(lists), lists.width), np.float32)
    for s in range(0, len(lists), chunk):
        part = slice(s, s + chunk)
        width = int(lists.hist_len[part].max()) if history <= 0 else history
        recent = recent_items(store.timeline_offsets, values, rows[part], lists.hist_len[part], max(width, 1))
        out[part] = model.scores(recent, lists.items[part])
    return np.stack([out, out - out.max(1, keepdims=True)], -1)


def ndcg_hr10(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    top = np.take_along_axis(labels, np.argsort(-scores, 1, kind="stable"), 1)[:, :10]
    return float((top / np.log2(np.arange(2, 12))).sum(1).mean()), float(top.sum(1).mean())


def fit(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, cols: list[int], hidden: int,
        epochs: int, seed: int) -> dict[str, Any]:
    """Listwise residual model over `cols` (column 0 is the retriever logit, the base score); best valid epoch."""
    import torch

    torch.manual_seed(seed)
    flat = x_tr.reshape(-1, x_tr.shape[-1])[:, cols]
    mu, sd = flat.mean(0), flat.std(0) + 1e-6
    d = len(cols)
    net = (torch.nn.Linear(d, 1) if not hidden else
           torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)))
    last = net if not hidden else net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = torch.from_numpy((x_tr[..., cols] - mu) / sd)
    base, y = torch.from_numpy(x_tr[..., 0]), torch.from_numpy(y_tr)
    xv, base_v = torch.from_numpy((x_va[..., cols] - mu) / sd), torch.from_numpy(x_va[..., 0])
    curve = []
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for s in range(0, len(x), 64):
            i = perm[s:s + 64]
            loss = -(torch.log_softmax(base[i] + net(x[i]).squeeze(-1), 1) * y[i]).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            curve.append(ndcg_hr10((base_v + net(xv).squeeze(-1)).numpy(), y_va))
    best = max(range(epochs), key=lambda e: curve[e][0])
    return {"ndcg@10": curve[best][0], "hr@10": curve[best][1], "best_epoch": best + 1,
            "curve_ndcg@10": [c[0] for c in curve]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m", choices=["beauty", "ml-100k", "ml-1m"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=5, help="the ranker's lists.context_window")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--work-dir", type=Path, default=REPO / "var" / "two_stage_bench")
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench")
    p.add_argument("--ranker-results", type=Path, help="a two_stage results file of the same lists")
    p.add_argument("--tag", default="")
    p.add_argument("--no-vectors", action="store_true",
                   help="skip the retriever u*v and similarity sets (they need the cached exports)")
    p.add_argument("--ease", action="store_true", help="add the +ease set (an EASE model fitted per split)")
    p.add_argument("--ease-lambda", type=float, default=500.0)
    p.add_argument("--ease-k", type=int, default=256, help="weights kept per candidate (0: all)")
    p.add_argument("--ease-history", type=int, default=0, help="behaviors the score reads (0: the whole history)")
    p.add_argument("--sets", nargs="*", default=[], help="only these feature sets (names as in the table)")
    args = p.parse_args()

    from features.candidate_lists import LIST_FEATURE_NAMES, CandidateLists
    from features.list_context import CONTEXT_FEATURE_NAMES
    from features.reader import FeatureStore

    work = args.work_dir / args.dataset / f"seed{args.seed}"
    found = {s: sorted(work.glob(f"lists-{s}-top*.npz")) for s in ("train", "valid")}
    if not all(found.values()):
        raise SystemExit(f"{work} holds no cached lists: run benchmarks/two_stage_bench.py --dataset {args.dataset} "
                         f"--seed {args.seed} first")
    store = FeatureStore(prepare_features(args.dataset, args.shared_data, args.data_dir))
    train, valid = (CandidateLists.load(found[s][0]) for s in ("train", "valid"))
    all_train = train
    train = train.take(np.flatnonzero(train.hit()))  # as the ranker trains: lists that hold their target
    t0 = time.perf_counter()
    x_tr, names = build_features(store, train, args.window)
    x_va, _ = build_features(store, valid, args.window)
    exports = {"train": work / "retriever-holdout" / "export", "valid": work / "retriever" / "export"}
    with_uv = not args.no_vectors and all((e / "manifest.json").exists() for e in exports.values())
    if with_uv:  # the lists' own retrievers: holdout for training lists, the served one for valid lists
        uv_tr, sim_tr = retriever_features(store, train, exports["train"])
        uv_va, sim_va = retriever_features(store, valid, exports["valid"])
        err = np.abs(uv_va.sum(-1) - valid.logits).max()
        print(f"  retriever u*v: {uv_tr.shape[-1]} columns; max |sum - logit| on valid {err:.2e}", flush=True)
        names += [*SIM_NAMES, *(f"retriever_uv_{d}" for d in range(uv_tr.shape[-1]))]
        x_tr, x_va = np.concatenate([x_tr, sim_tr, uv_tr], -1), np.concatenate([x_va, sim_va, uv_va], -1)
        del uv_tr, uv_va, sim_tr, sim_va
    if args.ease:  # fitted on what each list's retriever trained on: the prefix before its first list
        ease = [ease_features(store, lst, src, args.ease_lambda, args.ease_k, args.ease_history)
                for lst, src in ((train, all_train), (valid, valid))]
        names += ["ease_score", "ease_gap"]
        x_tr, x_va = np.concatenate([x_tr, ease[0]], -1), np.concatenate([x_va, ease[1]], -1)
        print(f"  ease: lambda {args.ease_lambda:g}, k {args.ease_k}, history {args.ease_history}; valid lists' "
              f"ease-alone ndcg@10 {ndcg_hr10(ease[1][..., 0], valid.labels())[0]:.4f}", flush=True)
    print(f"features {x_tr.shape} train, {x_va.shape} valid in {time.perf_counter() - t0:.0f}s", flush=True)
    y_tr, y_va = train.labels(), valid.labels()
    n_base = len(LIST_FEATURE_NAMES) + len(CONTEXT_FEATURE_NAMES)
    sets = {
        "list+context": list(range(n_base)),
        "+time windows": list(range(n_base)) + [names.index(f"log_item_count_{w}h") for w in WINDOWS_H],
        "+wide cooc": list(range(n_base)) + [i for i, nm in enumerate(names) if nm.endswith(tuple(f"_{w}" for w in WIDE))],
        "all": [i for i, nm in enumerate(names) if not nm.startswith(("retriever_", "ease_"))],
    }
    if with_uv:
        uv_cols = [i for i, nm in enumerate(names) if nm.startswith("retriever_uv_")]
        sets["+retriever u*v"] = list(range(n_base)) + uv_cols
        sets["+retriever sims"] = list(range(n_base)) + [names.index(nm) for nm in SIM_NAMES]
    if args.ease:
        sets["+ease"] = list(range(n_base)) + [names.index("ease_score"), names.index("ease_gap")]
    if args.sets:
        unknown = set(args.sets) - set(sets)
        if unknown:
            raise SystemExit(f"--sets: unknown {sorted(unknown)}; have {list(sets)}")
        sets = {k: v for k, v in sets.items() if k in args.sets}
    retr = ndcg_hr10(valid.logits, y_va)
    rows = [["retriever alone", "-", f"{retr[0]:.4f}", f"{retr[1]:.4f}", "-"]]
    out: dict[str, Any] = {"dataset": args.dataset, "seed": args.seed, "split": "valid lists (validation only)",
                           "train_lists": len(train), "valid_lists": len(valid), "features": names,
                           "retriever": {"ndcg@10": retr[0], "hr@10": retr[1]}, "models": {}}
    for model, hidden in (("linear", 0), (f"mlp{args.hidden}", args.hidden)):
        for label, cols in sets.items():
            r = fit(x_tr, y_tr, x_va, y_va, cols, hidden, args.epochs, args.seed)
            out["models"][f"{model} {label}"] = {**r, "features": [names[c] for c in cols]}
            rows.append([model, label, f"{r['ndcg@10']:.4f}", f"{r['hr@10']:.4f}", str(r["best_epoch"])])
            print(f"  {model} {label}: valid ndcg@10 {r['ndcg@10']:.4f}", flush=True)
    if args.ranker_results:
        res = json.loads(args.ranker_results.read_text())["results"]
        v = res["valid"]["pipeline"]
        out["ranker"] = {"file": str(args.ranker_results), "ndcg@10": v["ndcg@10"], "hr@10": v["hr@10"]}
        rows.append(["full ranker", args.ranker_results.name, f"{v['ndcg@10']:.4f}", f"{v['hr@10']:.4f}",
                     str(res["ranker"]["best_epoch"])])
    print_table(f"List-feature probe: {args.dataset} seed {args.seed}, valid lists", ["model", "features", "valid ndcg@10", "valid hr@10", "best epoch"], rows)
    path = write_results(f"two_stage/{args.dataset}/list-probe-seed{args.seed}{args.tag}", out, benchmark="list_probe")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
