"""The building blocks of the self-contained report pages: escaping, tables, embedded images, style.

Every page is one file: images are base64 data URIs, the style is inline, there is no script and
no remote asset, and a Content-Security-Policy says so to the browser.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.images import open_image
from zoo.errors import ZooError

REPORT_FILE = "report.html"  # the page's name in a run or comparison folder
THUMBNAIL_PX = 128  # the longer side of a gallery thumbnail

# What a page may load: images from data: URIs and its own inline style, nothing else.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d0d7de; --soft:#f6f8fa; --bad:#cf222e;
        --good:#1a7f37; --accent:#0969da; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 8px; }
p.sub, .muted { color: var(--muted); }
nav { margin: 14px 0 4px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 14px; }
a { color: var(--accent); text-decoration: none; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0 6px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 130px;
        background: var(--soft); }
.card b { display: block; font-size: 22px; }
.card span { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail td { color: var(--bad); }
.bar { display: inline-block; height: 9px; background: var(--accent); border-radius: 2px;
       margin-right: 8px; vertical-align: middle; opacity: .75; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.plots figure { margin: 0; max-width: 48%; }
.plots figcaption { font-weight: 600; margin-bottom: 4px; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure.thumb { margin: 0; width: 148px; border: 2px solid var(--bad); border-radius: 8px;
               padding: 6px; background: #fff; font-size: 12px; line-height: 1.35; }
figure.thumb.correct { border-color: var(--good); }
figure.twin, figure.suspect { margin: 0; border: 2px solid var(--line); border-radius: 8px;
               padding: 6px; background: #fff; font-size: 12px; line-height: 1.35; width: 220px; }
figure.suspect { width: 124px; border-color: #bf8700; }
figure.twin img, figure.suspect img, figure.twin .missing, figure.suspect .missing {
               display: inline-block; width: 100px; height: 100px; object-fit: contain;
               background: var(--soft); }
figure.twin .name, figure.suspect .name { color: var(--muted); overflow: hidden;
               text-overflow: ellipsis; white-space: nowrap; }
figure.thumb img, figure.thumb .missing { display: block; width: 128px; height: 128px;
               margin: 0 auto 4px; object-fit: contain; background: var(--soft); }
figure.thumb .missing { color: var(--muted); text-align: center; padding-top: 50px; }
figure.thumb .name { color: var(--muted); overflow: hidden; text-overflow: ellipsis;
               white-space: nowrap; }
.verdict { font-weight: 700; padding: 1px 8px; border-radius: 4px; color: #fff; }
.verdict.pass { background: var(--good); }
.verdict.fail { background: var(--bad); }
.note { border-left: 4px solid var(--accent); background: var(--soft); padding: 8px 12px;
        margin: 10px 0; }
.note.warn { border-color: #bf8700; }
code { background: var(--soft); padding: 1px 5px; border-radius: 4px; font-size: 13px; }
details { margin: 8px 0; }
.cols { display: flex; flex-wrap: wrap; gap: 8px 40px; align-items: flex-start; }
.cols > div { min-width: 0; max-width: 100%; }
.cols td { max-width: 460px; }
img.pair { width: 48px; height: 48px; object-fit: contain; background: var(--soft); }
.classes { display: flex; flex-wrap: wrap; gap: 6px; }
.classes span { background: var(--soft); border: 1px solid var(--line); border-radius: 12px;
                padding: 0 10px; font-size: 13px; }
figure.cam { margin: 0; width: 148px; border: 2px solid var(--bad); border-radius: 8px;
             padding: 6px; font-size: 12px; line-height: 1.35; }
figure.cam.correct { border-color: var(--good); }
figure.cam img { display: block; width: 128px; height: 128px; margin: 0 auto 4px; }
figure.cam .name { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
"""


def esc(value: Any) -> str:
    """Any value as HTML text: class names and paths come from the user's folders."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, *, digits: int = 4) -> str:
    """A number for a table cell: floats rounded, missing values as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return esc(value)


def percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1%}"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    numeric: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
    raw: bool = False,
) -> str:
    """An HTML table; cells are escaped unless `raw` (then the caller built them)."""
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = []
    for index, row in enumerate(rows):
        cells = "".join(
            f'<td class="num">{c if raw else fmt(c)}</td>'
            if i in numeric
            else f"<td>{c if raw else fmt(c)}</td>"
            for i, c in enumerate(row)
        )
        cls = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(pairs: Mapping[str, Any]) -> str:
    """A two-column table of names and values (values escaped; floats to 4 significant digits)."""
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(f'{v:.4g}') if isinstance(v, float) else fmt(v)}</td></tr>"
        for k, v in pairs.items()
    )
    return f"<table><tbody>{rows}</tbody></table>"


def bar(fraction: float | None, width_px: int = 90) -> str:
    """A small inline bar for a fraction in [0, 1]."""
    if fraction is None or math.isnan(fraction):
        return ""
    return (
        f'<span class="bar" style="width:{max(1, round(width_px * min(1.0, fraction)))}px"></span>'
    )


def verdict(passed: bool) -> str:
    return (
        '<span class="verdict pass">PASSED</span>'
        if passed
        else '<span class="verdict fail">FAILED</span>'
    )


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def embedded_png(path: Path, *, alt: str) -> str | None:
    """An <img> holding the PNG at `path`, or None when the file is not there."""
    try:
        payload = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return f'<img class="plot" alt="{esc(alt)}" src="{data_uri(payload, "image/png")}">'


def thumbnail(ref: str, *, size: int = THUMBNAIL_PX) -> str | None:
    """A JPEG data URI of the image at `ref` (a path or a built-in ref), its longer side `size` px.

    None when the image cannot be read any more (moved, deleted): the caption still says what it was.
    """
    from PIL import Image

    try:
        img = open_image(ref, draft=2 * size)
    except (ZooError, OSError):
        return None
    scale = size / max(img.size)
    # Tiny images (8x8 digits) grow with sharp pixels; photos shrink smoothly.
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    shape = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    buffer = io.BytesIO()
    img.resize(shape, resample).save(buffer, format="JPEG", quality=85)
    return data_uri(buffer.getvalue(), "image/jpeg")


def columns(*blocks: str) -> str:
    """Blocks side by side, wrapping on narrow screens."""
    return '<div class="cols">' + "".join(f"<div>{b}</div>" for b in blocks) + "</div>"


def warning(text: str) -> str:
    """A highlighted note; `text` is HTML the caller built."""
    return f'<p class="note warn">{text}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(
    *, title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], cards: str = ""
) -> str:
    """The whole document: header, a navigation line, then each (anchor, title, body) section."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(section(*s) for s in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f'<body><main><header><h1>{esc(title)}</h1><p class="sub">{subtitle}</p>{cards}'
        f"<nav>{nav}</nav></header>{body}</main></body></html>\n"
    )


def cards(items: Sequence[tuple[str, str]]) -> str:
    """Headline figures: (value, what it is) pairs, already formatted."""
    inner = "".join(
        f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for v, k in items
    )
    return f'<div class="cards">{inner}</div>'
