"""The report document: a list of blocks rendered to Markdown and to a standalone HTML page.

A block is a tuple: ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("warn", text)``,
``("list", items)``, ``("table", header, rows)``, ``("img", path, caption)``, ``("pre", text)``.
Images are linked relative to the output dir in Markdown and embedded as data URIs in HTML.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:8px;overflow:auto}
.warn{color:#a00;font-weight:bold}"""


def md_table(header, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, caption: str, out: Path) -> tuple[str, str]:
    rel = os.path.relpath(path, out)
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
        return b[1], f"<p>{html.escape(b[1])}</p>"
    if kind == "warn":
        return f"**{b[1]}**", f'<p class="warn">{html.escape(b[1])}</p>'
    if kind == "list":
        return ("\n".join(f"- {x}" for x in b[1]),
                "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b[1]) + "</ul>")
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
