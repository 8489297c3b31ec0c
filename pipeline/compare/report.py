"""The comparison as one self-contained HTML file (``revcol compare --html REPORT.html``) for sharing: the compared
runs, the summary table (differing params, final and best metrics) and every plot, the PNGs embedded as base64
``data:`` URIs — no file or network access needed to view it."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from pipeline.compare.comparison import Comparison
from pipeline.compare.table import table_rows

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1a1a1a; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.section td { background: #f6f6f6; font-weight: 600; }
figure { display: inline-block; margin: 8px 16px 8px 0; } figcaption { font-size: 13px; color: #444; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(comparison: Comparison) -> str:
    rows = table_rows(comparison, clip=None)
    header, body = rows[0], rows[1:]
    assert isinstance(header, list)
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in header) + "</tr>"]
    for row in body:
        if isinstance(row, str):
            out.append(f'<tr class="section"><td colspan="{len(header)}">{html.escape(row)}</td></tr>')
            continue
        label, *cells = row
        out.append("<tr><th>" + html.escape(label.strip()) + "</th>"
                   + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(comparison: Comparison, *, title: str = "revcol compare") -> str:
    """The report as an HTML document (the plots read from ``comparison.pngs``).

    Args:
        comparison: the result of :func:`pipeline.compare.compare_runs`, its PNGs written.
        title: the page title.
    """
    figures = [
        f'<figure><img src="{_png_data_uri(path)}" alt="{html.escape(metric)}">'
        f"<figcaption>{html.escape(metric)}</figcaption></figure>"
        for metric, path in comparison.pngs.items()
    ]
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    count = len(comparison.subjects)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{count} subject{"" if count == 1 else "s"} from {html.escape(comparison.tracking_uri)}, '
        f"made {html.escape(made)}</p>",
        "<h2>Summary</h2>",
        _table(comparison),
        "<h2>Plots</h2>",
        *(figures or ["<p>No metric plotted.</p>"]),
        "</body></html>",
    ])


def write_html_report(comparison: Comparison, path: str | Path, *, title: str = "revcol compare") -> Path:
    """Writes :func:`render_html` to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(comparison, title=title), encoding="utf-8")
    return path
