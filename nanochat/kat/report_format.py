"""
Formatting shared by the diversity report's modules (nanochat/kat/diversity_report.py and
arms_report.py): numbers, signed differences, p-values, intervals, markdown tables and cells, and
the JSON-safe form of every figure.
"""

import math
from pathlib import Path

import numpy as np


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}g}"


def fmt_signed(value, digits: int = 4) -> str:
    text = fmt(value, digits)
    return text if text == "n/a" or text.startswith("-") else "+" + text


def fmt_p(p) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def fmt_ci(ci) -> str:
    return f"[{fmt_signed(ci[0])}, {fmt_signed(ci[1])}]"


def better_word(direction) -> str:
    return {"lower": "lower", "higher": "higher"}.get(direction, "(descriptive)")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cell_text(text: str, limit: int) -> str:
    """A response as one markdown table cell: cut to `limit` characters, line breaks as <br>."""
    cut = text if len(text) <= limit else text[:limit] + " [...]"
    cut = "".join(ch if ch.isprintable() or ch == "\n" else "\ufffd" for ch in cut)  # no control characters in markdown
    cut = cut.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return cut.replace("\n", "<br>") if cut.strip() else "(empty)"


def jsonable(obj):
    """Plain JSON data: numpy to Python, tuples to lists, paths to strings, NaN and infinities to null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
