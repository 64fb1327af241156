"""The [3/5] table's targets, checked on the scored rows, and the GPTQ paper's OPT-125M row beside ours.

Used by quant_table.py to append both to the methods set's compare.md (and compare.json["checks"]).
"""
from __future__ import annotations

# GPTQ paper (Frantar et al., 2022), Table 3, OPT-125M, WikiText-2 perplexity at seqlen 2048.
PAPER_OPT125M = {"fp16": 27.65, "RTN 4-bit": 37.28, "GPTQ 4-bit": 31.12, "GPTQ 3-bit": 53.85}
OURS = {"fp16": "base", "RTN 4-bit": "rtn-w4-ch", "GPTQ 4-bit": "gptq-w4-ch", "GPTQ 3-bit": "gptq-w3-ch"}

# (target, kind, a, b, factor): "ratio" holds when ΔPPL(a) <= factor * ΔPPL(b); "below" when PPL(a) < PPL(b);
# "pct" when ΔPPL%(a) < factor.
TARGETS = [
    ("GPTQ W4 per-channel ΔPPL ≤ ½ of RTN's", "ratio", "gptq-w4-ch", "rtn-w4-ch", 0.5),
    ("GPTQ W3 per-channel ΔPPL ≤ 40% of RTN's", "ratio", "gptq-w3-ch", "rtn-w3-ch", 0.4),
    ("GPTQ W4 g128 below RTN W4 g128", "below", "gptq-w4-g128", "rtn-w4-g128", None),
    ("GPTQ W3 g128 below RTN W3 g128", "below", "gptq-w3-g128", "rtn-w3-g128", None),
    ("AWQ W4 g128 below RTN W4 g128", "below", "awq-w4-g128", "rtn-w4-g128", None),
    ("LLM.int8() ΔPPL < 0.5%", "pct", "llm-int8", None, 0.5),
    ("SmoothQuant W8A8 below naive W8A8 (per-token dynamic)", "below", "smoothquant-dynamic", "w8a8-dynamic", None),
    ("ZeroQuant W4 g128 A8: LKD below no LKD", "below", "zeroquant-w4-g128-a8-lkd", "zeroquant-w4-g128-a8", None),
]


def check(rows: dict[str, dict], total_windows: int) -> list[dict]:
    """One entry per target: the numbers it compares and "holds" / "does not hold" / "pending"
    (a row missing or not yet scored on every window)."""
    out = []
    for target, kind, a, b, factor in TARGETS:
        need = [n for n in (a, b) if n]
        missing = [n for n in need if n not in rows]
        partial = [n for n in need if n in rows and rows[n]["windows"] < total_windows]
        if missing:
            out.append({"target": target, "status": "pending", "detail": f"not scored yet: {', '.join(missing)}"})
            continue
        ra, rb = rows[a], rows.get(b)
        if kind == "ratio":
            ratio = ra["delta_ppl"] / rb["delta_ppl"]
            ok = ratio <= factor
            detail = f"ΔPPL {ra['delta_ppl']:+.3f} vs {rb['delta_ppl']:+.3f}: ratio {ratio:.3f} (limit {factor})"
        elif kind == "below":
            ok = ra["perplexity"] < rb["perplexity"]
            detail = f"PPL {ra['perplexity']:.3f} vs {rb['perplexity']:.3f}"
        else:
            ok = ra["delta_ppl_pct"] < factor
            detail = f"ΔPPL {ra['delta_ppl_pct']:+.3f}% (limit {factor}%)"
        if partial:
            detail += f" — on {min(rows[n]['windows'] for n in need)} of {total_windows} windows so far"
        out.append({"target": target, "status": ("holds" if ok else "does not hold") + (" (so far)" if partial else ""),
                    "detail": detail})
    return out


def paper_table(rows: dict[str, dict]) -> str:
    """Markdown: the GPTQ paper's OPT-125M row beside SmolLM2-135M's (PPL and increase over the baseline)."""
    p0 = PAPER_OPT125M["fp16"]
    base = rows.get("base")
    lines = ["| | GPTQ paper, OPT-125M (fp16 baseline) | increase | lowbit, SmolLM2-135M (Q4_1 baseline) | increase |",
             "|---|---:|---:|---:|---:|"]
    for k, p in PAPER_OPT125M.items():
        r = rows.get(OURS[k])
        ours = f"{r['perplexity']:.2f} | {r['delta_ppl_pct']:+.1f}%" if r and base else "pending | "
        lines.append(f"| {k} | {p:.2f} | {100 * (p / p0 - 1):+.1f}% | {ours} |")
    return "\n".join(lines)


def kv_table(rows: dict[str, dict], kv_bytes: dict[str, float] | None) -> str:
    """Markdown: KV-cache bytes per token (all layers, K and V) and the ΔPPL each format costs."""
    if not kv_bytes:
        return ""
    fp16 = kv_bytes["fp16"]
    lines = ["| KV cache | bytes/token | saved vs fp16 | ΔPPL |", "|---|---:|---:|---:|",
             f"| fp16 | {fp16:,.0f} | — | — |"]
    for fmt in ("int8", "fp8"):
        r = rows.get(f"kv-{fmt}")
        d = f"{r['delta_ppl_pct']:+.3f}%" if r else "pending"
        saved = 1 - kv_bytes[fmt] / fp16
        lines.append(f"| {fmt} (scale per token and head) | {kv_bytes[fmt]:,.0f} | {saved:.1%} | {d} |")
    return "\n".join(["", "## KV-cache quantization", "", *lines, ""])


def markdown(rows: dict[str, dict], total_windows: int, kv_bytes: dict[str, float] | None = None) -> str:
    checks = check(rows, total_windows)
    body = [f"| {c['target']} | {c['status']} | {c['detail']} |" for c in checks]
    return "\n".join(["", "## Targets of issue [3/5]", "", "| target | result | numbers |", "|---|---|---|", *body,
                      "", "## Beside the GPTQ paper", "", paper_table(rows), kv_table(rows, kv_bytes)])
