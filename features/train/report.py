"""Per-epoch metrics as JSON and training curves as PNG, written as training goes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence


class MetricsLog:
    """Appends one record per epoch to <dir>/metrics.json and redraws <dir>/curves.png.

    records: the epochs a resumed run already has (written again with the next `append`).
    """

    def __init__(self, out_dir: Path, title: str, plot_keys: Sequence[str],
                 records: Sequence[dict[str, Any]] = ()) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.plot_keys = tuple(plot_keys)
        self.records: list[dict[str, Any]] = list(records)

    @property
    def json_path(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def png_path(self) -> Path:
        return self.dir / "curves.png"

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.json_path.write_text(json.dumps({"title": self.title, "epochs": self.records}, indent=2) + "\n")
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in self.plot_keys if any(isinstance(r.get(k), (int, float)) for r in self.records)]
        if not keys:
            return
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for ax, key in zip(axes.ravel(), keys):
            xs = [r.get("epoch", i) for i, r in enumerate(self.records) if isinstance(r.get(key), (int, float))]
            ys = [r[key] for r in self.records if isinstance(r.get(key), (int, float))]
            ax.plot(xs, ys, marker="o")
            ax.set_title(key)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(keys):]:
            ax.axis("off")
        fig.suptitle(self.title)
        fig.tight_layout()
        fig.savefig(self.png_path, dpi=90)
        plt.close(fig)


def write_convergence(out_dir: Path, records: Sequence[dict[str, Any]], metric: str, title: str,
                      clock: str = "minutes", extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """<dir>/convergence.json and convergence.png: `metric` per epoch and per minute of training.

    records: per-epoch records holding "epoch", `clock` (cumulative training minutes) and, on evaluated
    epochs, `metric`. Returns (json path, png path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [{"epoch": r["epoch"], "minutes": r.get(clock), metric: r[metric]}
              for r in records if isinstance(r.get(metric), (int, float))]
    jpath, ppath = out / "convergence.json", out / "convergence.png"
    jpath.write_text(json.dumps({"title": title, "metric": metric, "clock": clock, **dict(extra or {}),
                                 "points": points}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2), squeeze=False)
    for ax, x, label in ((axes[0, 0], "epoch", "epoch"), (axes[0, 1], "minutes", "training minutes")):
        xs = [p[x] for p in points if isinstance(p[x], (int, float))]
        ys = [p[metric] for p in points if isinstance(p[x], (int, float))]
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(ppath, dpi=90)
    plt.close(fig)
    return jpath, ppath
