"""The listening report of an evaluation: one self-contained ``report.html`` beside ``summary.json``.

The page needs no network and links only files in its own folder (relative URLs): the codec settings, a
summary table (mean ± standard deviation and count per metric, over all clips and per category, a category
being a clip's first subfolder such as ``speech/``), every clip's metrics, and for the clips that have them
the original and the reconstruction as audio players with their spectrograms side by side. Tables sort by
a click on a column heading (a few lines of inline JavaScript). The numbers are those of ``summary.json``;
each summary cell carries them unrounded in ``data-mean``/``data-std``/``data-count``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

ALL = "all clips"
TOP_LEVEL = "(top level)"

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
main{max-width:1280px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px}h3{font-size:15px;margin:0}
.sub{color:#5b6677;margin:0 0 16px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002;border-radius:6px;overflow:hidden}
th,td{padding:6px 12px;text-align:right;border-bottom:1px solid #e6e9ef;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
thead th{background:#2b3a55;color:#fff;font-weight:600;position:sticky;top:0}
th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:" \\2195";opacity:.45}
th[aria-sort=ascending]:after{content:" \\2191";opacity:1}th[aria-sort=descending]:after{content:" \\2193";opacity:1}
tr.all td{font-weight:600;background:#eef2f8}
td .sd{color:#7a8494;font-size:12px}td .n{color:#9aa3b1;font-size:11px}
td.err{color:#a33;text-align:left;white-space:normal;max-width:420px;font-size:12px}
dl.codec{display:grid;grid-template-columns:max-content auto;gap:4px 16px;background:#fff;padding:12px 18px;
 border-radius:6px;box-shadow:0 1px 2px #0002;width:max-content}
dl.codec dt{color:#5b6677}dl.codec dd{margin:0;font-weight:600}
.clip{background:#fff;border-radius:6px;box-shadow:0 1px 2px #0002;padding:14px 18px;margin:0 0 18px}
.clip header{display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 18px;margin-bottom:10px}
.clip header .cat{color:#5b6677;font-size:12px}.scores{font-size:12px;color:#3d4757}
.scores b{font-weight:600}.players{display:grid;grid-template-columns:1fr 1fr;gap:12px;margin-bottom:10px}
.players figure{margin:0}.players figcaption{font-size:12px;color:#5b6677;margin-bottom:2px}
audio{width:100%}img.spec{width:100%;height:auto;display:block;border:1px solid #e6e9ef}
.nospec{color:#7a8494;font-size:12px}
"""

_SORT_SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, col) => {
    th.classList.add("sortable");
    th.addEventListener("click", () => {
      const ascending = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(h => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const body = table.tBodies[0];
      const key = row => {
        const cell = row.cells[col];
        const v = cell.dataset.sort ?? cell.dataset.mean ?? cell.textContent;
        return v === "" || isNaN(v) ? v : parseFloat(v);
      };
      const rows = [...body.rows];
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === y) return 0;
        if (x === "" || x === undefined) return 1;  // missing values last either way
        if (y === "" || y === undefined) return -1;
        return (x < y ? -1 : 1) * (ascending ? 1 : -1);
      });
      rows.forEach(r => body.appendChild(r));
    });
  });
}
"""


def category_of(name: str) -> str:
    """A clip's category: its first folder (``speech/p225_001`` -> ``speech``)."""
    return name.split("/", 1)[0] if "/" in name else TOP_LEVEL


def relative_url(path: Path, folder: Path) -> str:
    """``path`` as a URL relative to ``folder`` (each part percent-encoded)."""
    return "/".join(quote(part) for part in path.relative_to(folder).parts)


def _number(value: Any, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _data(value: Any) -> str:
    return "" if value is None else repr(value)


def _summary_cell(metric: str, category: str, stats: Mapping[str, Any]) -> str:
    mean, std, count = stats.get("mean"), stats.get("std"), stats.get("count", 0)
    shown = "n/a" if mean is None else (f"{_number(mean)} <span class=sd>± {_number(std)}</span> "
                                        f"<span class=n>n={count}</span>")
    return (f'<td data-metric="{metric}" data-category="{html.escape(category)}" data-mean="{_data(mean)}" '
            f'data-std="{_data(std)}" data-count="{count}">{shown}</td>')


def summary_table(summary: Mapping[str, Any], metric_names: Sequence[str]) -> str:
    """Mean ± std (and count) per metric: all clips, then each category of ``summary["categories"]``."""
    groups = [(ALL, summary["files"], summary["metrics"])]
    groups += [(cat, group["files"], group["metrics"]) for cat, group in summary.get("categories", {}).items()]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metric_names)
    body = "".join(
        f'<tr class="{"all" if cat == ALL else "cat"}"><td>{html.escape(cat)}</td><td data-sort="{files}">{files}</td>'
        + "".join(_summary_cell(m, cat, stats[m]) for m in metric_names) + "</tr>"
        for cat, files, stats in groups)
    return (f'<table id="summary" class="sortable"><thead><tr><th>category</th><th>files</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def clips_table(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str], listened: set[str]) -> str:
    """Every clip's metrics (and error), sortable; a clip with players links to its card."""
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metric_names)
    body = []
    for row in sorted(rows, key=lambda r: r["file"]):
        name = row["file"]
        label = html.escape(name)
        link = f'<a href="#clip-{quote(name)}">{label}</a>' if name in listened else label
        cells = "".join(f'<td data-sort="{_data(row.get(m))}">{_number(row.get(m))}</td>' for m in metric_names)
        body.append(f'<tr><td data-sort="{label}">{link}</td><td>{html.escape(category_of(name))}</td>'
                    f'<td data-sort="{_data(row.get("duration_s"))}">{_number(row.get("duration_s"), 2)}</td>'
                    f'{cells}<td class="err">{html.escape(row.get("error") or "")}</td></tr>')
    return (f'<table id="clips" class="sortable"><thead><tr><th>file</th><th>category</th><th>duration (s)</th>'
            f'{head}<th>error</th></tr></thead><tbody>{"".join(body)}</tbody></table>')


def clip_card(row: Mapping[str, Any], media: Mapping[str, str | None], metric_names: Sequence[str],
              labels: tuple[str, str]) -> str:
    """One clip: its scores, the two players and the spectrogram image (``media``: relative URLs of
    ``original``, ``reconstruction`` and ``spectrogram``, the last maybe ``None``)."""
    name = row["file"]
    scores = " · ".join(f"{html.escape(m)} <b>{_number(row[m])}</b>" for m in metric_names
                        if row.get(m) is not None)
    players = "".join(
        f'<figure><figcaption>{label}</figcaption><audio controls preload="metadata" '
        f'src="{html.escape(media[key])}"></audio></figure>'
        for key, label in zip(("original", "reconstruction"), labels, strict=True))
    spectrogram = (f'<img class="spec" alt="spectrograms of {html.escape(name)}" src="{html.escape(src)}">'
                   if (src := media.get("spectrogram")) else '<p class="nospec">no spectrogram for this clip</p>')
    return (f'<article class="clip" id="clip-{quote(name)}"><header><h3>{html.escape(name)}</h3>'
            f'<span class="cat">{html.escape(category_of(name))}</span><span class="scores">{scores}</span>'
            f'</header><div class="players">{players}</div>{spectrogram}</article>')


def codec_settings(summary: Mapping[str, Any]) -> str:
    """The settings a reader needs to judge the sound: mode, sampler, evaluations per window, bitrate."""
    codec = summary.get("codec") or {}
    items = [("mode", codec.get("compat")),
             ("sampler", codec.get("sampler")),
             ("estimator evaluations per window", codec.get("evaluations_per_window")),
             ("bitrate", f"{summary['bitrate_bps']:.0f} bit/s" if summary.get("bitrate_bps") else None),
             ("token rate", f"{summary['token_rate_hz']:.2f} Hz" if summary.get("token_rate_hz") else None),
             ("checkpoint", codec.get("checkpoint")),
             ("seed", codec.get("seed"))]
    shown = [(k, v) for k, v in items if v is not None]
    if not shown:
        shown = [("mode", "references only: two folders compared, no codec")]
    return '<dl class="codec">' + "".join(f"<dt>{k}</dt><dd>{html.escape(str(v))}</dd>" for k, v in shown) + "</dl>"


def render_report(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                  media: Mapping[str, Mapping[str, str | None]], metric_names: Sequence[str],
                  labels: tuple[str, str] = ("original", "reconstruction"), title: str = "Listening report") -> str:
    """The page's HTML. ``media`` maps a clip name to the relative URLs of its players and spectrogram."""
    by_name = {r["file"]: r for r in rows}
    cards = "".join(clip_card(by_name[name], urls, metric_names, labels) for name, urls in sorted(media.items()))
    listened = (f"<h2>Listen ({len(media)} of {len(rows)} clips)</h2>{cards}" if media else "")
    errors = summary.get("files_with_errors", 0)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head>'
            f"<body><main><h1>{html.escape(title)}</h1>"
            f'<p class="sub">{summary["files"]} clips, {errors} with errors. Click a column heading to sort.</p>'
            f"<h2>Codec</h2>{codec_settings(summary)}"
            f"<h2>Summary</h2>{summary_table(summary, metric_names)}"
            f"<h2>Clips</h2>{clips_table(rows, metric_names, set(media))}"
            f"{listened}</main><script>{_SORT_SCRIPT}</script></body></html>\n")


def write_report(out: Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 media: Mapping[str, Mapping[str, Path | None]], metric_names: Sequence[str],
                 labels: tuple[str, str] = ("original", "reconstruction")) -> Path:
    """``out/report.html``; ``media`` paths (inside ``out``) become relative URLs."""
    urls = {name: {k: relative_url(p, out) if p is not None else None for k, p in files.items()}
            for name, files in media.items()}
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(summary, rows, urls, metric_names, labels), encoding="utf-8")
    tmp.replace(path)
    return path
