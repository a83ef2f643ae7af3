"""The report document: a list of blocks rendered to Markdown and to a standalone HTML page.

A block is a tuple: ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("warn", text)``,
``("list", items)``, ``("verdict", items)`` (the report's conclusions, boxed in HTML),
``("table", header, rows)``, ``("img", path, caption)``, ``("pre", text)``.
Text may use ``*emphasis*`` and ``**strong**``. Images are linked relative to the output dir in
Markdown and embedded as data URIs in HTML, so ``report.html`` is one self-contained file and no
path in either document is absolute.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.15em;margin-top:1.8em}
h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:13.5px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f2f2f2}tbody tr:nth-child(even){background:#fafafa}
td{font-variant-numeric:tabular-nums}td.nw{white-space:nowrap}
td.better{background:#e3f4e3}td.worse{background:#fbe3e3}td.noise{background:#f4f4f4}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}
pre{background:#f7f7f7;padding:8px;overflow:auto}
.warn{color:#a00;font-weight:bold}
.verdict{background:#f3f7fc;border-left:5px solid #3a6ea5;padding:.6em 1em .6em 2em;margin:1em 0}
.verdict li{margin:.3em 0}"""

_VERDICT_CLASS = {"better": "better", "worse": "worse", "within noise": "noise"}


def _inline(text: str) -> str:
    """HTML-escaped text with ``**strong**`` and ``*emphasis*``."""
    s = html.escape(str(text))
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", s)


def md_table(header, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _td(c) -> str:
    s = str(c)
    cls = _VERDICT_CLASS.get(s) or next((v for k, v in _VERDICT_CLASS.items() if s.endswith("] " + k)), None)
    if len(s) <= 22:  # a name, a number, an interval: kept on one line
        cls = f"{cls} nw" if cls else "nw"
    return f'<td class="{cls}">{html.escape(s)}</td>' if cls else f"<td>{html.escape(s)}</td>"


def html_table(header, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, caption: str, out: Path) -> tuple[str, str]:
    rel = Path(os.path.relpath(path, out)).as_posix()
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"![{caption}]({rel})",
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)} ({html.escape(rel)})</figcaption></figure>")


def render_block(b: tuple, out: Path) -> tuple[str, str]:
    """(Markdown, HTML) of one block."""
    kind = b[0]
    if kind in ("h1", "h2", "h3"):
        return "#" * int(kind[1]) + " " + b[1], f"<{kind}>{html.escape(b[1])}</{kind}>"
    if kind == "p":
        return b[1], f"<p>{_inline(b[1])}</p>"
    if kind == "warn":
        return f"**{b[1]}**", f'<p class="warn">{_inline(b[1])}</p>'
    if kind in ("list", "verdict"):
        cls = ' class="verdict"' if kind == "verdict" else ""
        return ("\n".join(f"- {x}" for x in b[1]),
                f"<ul{cls}>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
    if kind == "table":
        return md_table(b[1], b[2]), html_table(b[1], b[2])
    if kind == "img":
        return _image(b[1], b[2], out)
    if kind == "pre":
        return "```\n" + b[1] + "\n```", f"<pre>{html.escape(b[1])}</pre>"
    raise ValueError(f"unknown report block {kind!r}")


def render(blocks: list[tuple], out: Path) -> tuple[str, str]:
    """(Markdown text, HTML page) of the whole document; image paths are relative to ``out``."""
    md, hb = zip(*(render_block(b, out) for b in blocks)) if blocks else ((), ())
    title = next((b[1] for b in blocks if b[0] == "h1"), "llm-refine report")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(hb) + "\n</body></html>\n")
    return "\n\n".join(md) + "\n", page
