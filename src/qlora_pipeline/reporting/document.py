"""The report as a list of blocks, rendered twice: Markdown and a self-contained HTML page (plots
embedded), so the two never disagree."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | img | verdict (the PASS/FAIL banner) | list
    text: str = ""
    headers: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(("#" if b.kind == "h1" else "##") + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "img":
            out.append(f"![{Path(b.text).stem}]({Path(b.text).name})")
        elif b.kind == "verdict":
            out.append(f"> **{b.text}**")
        elif b.kind == "list":
            out.extend(f"- {r[0]}" for r in b.rows)
        elif b.kind == "table":
            out.append("| " + " | ".join(b.headers) + " |")
            out.append("|" + "|".join("---" for _ in b.headers) + "|")
            out.extend("| " + " | ".join(r) + " |" for r in b.rows)
        out.append("")
    return "\n".join(out)


def inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>: no raw Markdown in the page."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block], title: str, folder: Path) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "verdict":
            state = "pass" if "PASS" in b.text.split(":", 2)[1] else "fail"
            body.append(f'<div class="verdict {state}">{inline(b.text)}</div>')
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{inline(r[0])}</li>" for r in b.rows) + "</ul>")
        elif b.kind == "img":
            data = base64.b64encode((folder / Path(b.text).name).read_bytes()).decode()
            body.append(
                f'<img alt="{html.escape(Path(b.text).stem)}" src="data:image/png;base64,{data}">'
            )
        elif b.kind == "table":
            head = "".join(f"<th>{inline(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:72rem;margin:1.5rem auto;padding:0 1rem;"
        "color:#222}table{border-collapse:collapse;margin:1rem 0;width:100%;table-layout:auto;"
        "font-size:.85rem}td,th{border:1px solid #ccc;padding:.25rem .45rem;text-align:right;"
        "overflow-wrap:anywhere}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;display:block;margin:1rem 0}code{background:#f3f3f3;padding:0 .2rem}"
        ".verdict{font-size:1.3rem;font-weight:600;padding:.8rem 1rem;border-radius:.4rem;"
        "margin:1rem 0}.pass{background:#e3f6e5;border:2px solid #2e7d32}"
        ".fail{background:#fde8e8;border:2px solid #c62828}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _interval(t: dict, key: str) -> str:
    return f"{t[key]:+.3f} [{t[key + '_ci_low']:+.3f}, {t[key + '_ci_high']:+.3f}]"


def score_rows(metrics: dict) -> list[dict[str, str]]:
    """One row per task of metrics.json: the scores, the gap and the noise floor with their
    intervals, and the verdict (the Prefect table artifact of a run)."""
    rows = []
    for task, t in metrics["tasks"].items():
        floor = t.get("noise_floor")
        rows.append(
            {
                "task": task,
                "n": str(t["n"]),
                "base": f"{t['base']:.3f}",
                "QLoRA (pooled)": f"{t['qlora']:.3f} ± {t['qlora_stderr']:.3f}",
                "LoRA (pooled)": f"{t['lora']:.3f} ± {t['lora_stderr']:.3f}",
                "QLoRA − LoRA [95% CI]": _interval(t, "gap"),
                "noise floor": "n/a" if floor is None else f"{floor:.3f}",
                "gate": metrics["verdict"],
            }
        )
    return rows


SUMMARY_KEYS = ("base", "qlora", "lora", "gap", "gap_ci_low", "gap_ci_high", "noise_floor")


def summary(metrics: dict) -> dict:
    """The headline of metrics.json, DVC's metrics file (`dvc exp show`, `dvc metrics diff`):
    the verdict and, per task, the scores, the gap with its interval and the noise floor. The
    full figures stay in metrics.json, which the gate and the registry read."""
    return {
        "verdict": metrics["verdict"],
        **{
            task: {k: (None if t.get(k) is None else round(t[k], 4)) for k in SUMMARY_KEYS}
            for task, t in metrics["tasks"].items()
        },
    }
