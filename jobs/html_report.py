"""A self-contained HTML report (tables + embedded PNG plots) for pipeline runs and the demo.

    rep = HtmlReport("Cascade demo")
    rep.section("Retriever", text="...", table=[{"metric": "hr@10", "value": 0.31}], images=[png_path])
    rep.write(out / "report.html")

Images are embedded as base64 so the file can be mailed or attached to a CI run.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.6rem} h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem} th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4rem 0} .meta{color:#666;font-size:.85rem}
pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return html.escape(str(v))


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p class=meta>(no rows)</p>"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class HtmlReport:
    title: str
    sections: list[str] = field(default_factory=list)

    def section(
        self,
        heading: str,
        *,
        text: str = "",
        table: Sequence[Mapping[str, Any]] | None = None,
        columns: Sequence[str] | None = None,
        images: Iterable[Path] = (),
        pre: str = "",
    ) -> None:
        parts = [f"<h2>{html.escape(heading)}</h2>"]
        if text:
            parts.append(f"<p>{html.escape(text)}</p>")
        if table is not None:
            parts.append(table_html(table, columns))
        for img in images:
            p = Path(img)
            if p.exists():
                data = base64.b64encode(p.read_bytes()).decode("ascii")
                parts.append(f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,{data}">')
            else:
                parts.append(f"<p class=meta>(missing plot {html.escape(str(p))})</p>")
        if pre:
            parts.append(f"<pre>{html.escape(pre)}</pre>")
        self.sections.append("\n".join(parts))

    def render(self) -> str:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return (
            f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
            f"<p class=meta>generated {now}</p>{''.join(self.sections)}</body></html>\n"
        )

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render())
        return path


def latency_histogram_png(samples_ms: Mapping[str, Sequence[float]], path: Path, title: str = "latency") -> Path:
    """Overlaid latency histograms (ms, log-x) for a few series, e.g. per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, xs in samples_ms.items():
        xs = np.asarray([x for x in xs if x > 0])
        if len(xs) == 0:
            continue
        bins = np.logspace(np.log10(max(xs.min(), 1e-3)), np.log10(xs.max() * 1.01), 40)
        ax.hist(xs, bins=bins, alpha=0.5, label=f"{name} (p50 {np.percentile(xs, 50):.2f}, p99 {np.percentile(xs, 99):.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
