"""Compare quantization configs on one model: every config against the base over the SAME windows.

The base model's logits are computed once per window and every quantized model is scored against them
(perplexity, KL(base‖model), top-1 agreement). Progress can be kept in a state file after every window,
so a long comparison cut short resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.atomic import write_json_atomic, write_text_atomic
from lowbit.eval.memory import PeakMemory, model_bytes
from lowbit.eval.perplexity import Reference, window_stats


@dataclass
class Candidate:
    name: str
    method: str
    options: dict = field(default_factory=dict)
    kv_cache: str | None = None      # "int8" | "fp8": also quantize the KV cache


def build(base, cand: Candidate, calib, device=None, progress: bool = False, cache: str | Path | None = None):
    """A quantized deep copy of `base` and what it cost: (model, info).

    cache: a directory for calibrated methods' results: the first build is saved there as a lowbit
    checkpoint (with its cost figures), later calls load it instead of calibrating again."""
    from lowbit.quant.api import quantize
    from lowbit.quant.registry import get_method

    method = get_method(cand.method, **cand.options)
    cached = Path(cache) / re.sub(r"[^A-Za-z0-9._-]+", "_", cand.name) if cache and method.needs_calibration else None
    if cached is not None and (cached / "build_info.json").is_file():
        from lowbit.models.loader import load
        model, _ = load(cached, dtype=base.dtype, device=str(base.device), tokenizer=False)
        return model, json.loads((cached / "build_info.json").read_text())
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    with PeakMemory(device or str(base.device)) as pm:
        res = quantize(model, method, calib if method.needs_calibration else None, device=device,
                       progress=progress)
    if cand.kv_cache:
        from lowbit.layers.kv_quant import KVQuant
        model.set_kv_quant(KVQuant(cand.kv_cache))
    layers = res.report.layers
    n_weights = sum(r.fp16_bytes for r in layers) / 2
    info = {"method": method.describe(), "kv_cache": cand.kv_cache,
            "quantize_seconds": time.perf_counter() - t0,
            "peak_memory_bytes": pm.peak_bytes, "model_bytes": model_bytes(model),
            "bits_per_weight": 8 * sum(r.format_bytes or r.stored_bytes for r in layers) / max(n_weights, 1),
            "simulated": any((r.format_bytes or r.stored_bytes) != r.stored_bytes for r in layers),
            "calibration": calib.describe() if (calib is not None and method.needs_calibration) else None}
    if cached is not None:
        res.save(model, None, cached, overwrite=True, kv_cache=cand.kv_cache, save_dtype=None)  # exact copy
        write_json_atomic(cached / "build_info.json", info)
    return model, info


def _empty() -> dict:
    return {"windows": 0, "tokens": 0, "nll": 0.0, "base_nll": 0.0, "kl": 0.0, "top1": 0.0}


@torch.inference_mode()
def score(base, models: dict, windows: torch.Tensor, state: dict, save=None, budget_s: float | None = None,
          progress: bool = True) -> dict:
    """Accumulate per-window sums for "base" and every model in `models` into state["results"]."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    results = state.setdefault("results", {})
    for n in ["base", *models]:
        results.setdefault(n, _empty())
    for w in tqdm(range(windows.shape[0]), desc="compare", unit="win", disable=not progress):
        pending = [n for n in ["base", *models] if results[n]["windows"] == w]
        if not pending:
            continue
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break   # each row's "windows" says how far it got
        ids = windows[w: w + 1].to(base.device)                           # [1, S]
        base_logits = base(ids)[0, :-1]                                   # [S-1, V]
        ref = Reference.of(base_logits, ids[0, 1:])
        for n in pending:
            logits = base_logits if n == "base" else models[n](ids.to(models[n].device))[0, :-1]
            s = window_stats(logits, ids[0, 1:], ref)
            r = results[n]
            r["windows"] += 1
            r["tokens"] += ids.shape[1] - 1
            for k in ("nll", "base_nll", "kl", "top1"):
                r[k] += s[k]
        if save is not None:
            save(state)
    return state


def summary(state: dict) -> list[dict]:
    """One row per config: perplexity, ΔPPL, KL, top-1, bytes, bits per weight, time, memory."""
    rows = []
    for name, r in state["results"].items():
        if not r["windows"]:
            continue
        info = state.get("info", {}).get(name, {})
        ppl, bppl = math.exp(r["nll"] / r["tokens"]), math.exp(r["base_nll"] / r["tokens"])
        rows.append({"config": name, "perplexity": ppl, "delta_ppl": ppl - bppl, "delta_ppl_pct": 100 * (ppl / bppl - 1),
                     "kl": r["kl"] / r["tokens"], "top1_agreement": r["top1"] / r["tokens"],
                     "windows": r["windows"], "tokens": r["tokens"],
                     "model_bytes": info.get("model_bytes", state.get("base_bytes")),
                     "bits_per_weight": info.get("bits_per_weight", 16.0),
                     "simulated": bool(info.get("simulated")),
                     "quantize_seconds": info.get("quantize_seconds", 0.0),
                     "peak_memory_bytes": info.get("peak_memory_bytes", 0),
                     "calibrated_on": info.get("calibrated_on")})   # set where another machine calibrated it
    return rows


def markdown(state: dict, title: str) -> str:
    rows = summary(state)
    head = ["| config | PPL | ΔPPL | ΔPPL % | KL (nats/tok) | top-1 | bits/weight | model MB | quantize s | peak MB | windows |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    body = [f"| {r['config']}{'*' if r['simulated'] else ''} | {r['perplexity']:.3f} | {r['delta_ppl']:+.3f} | "
            f"{r['delta_ppl_pct']:+.2f}% | "
            f"{r['kl']:.5f} | {100 * r['top1_agreement']:.2f}% | {r['bits_per_weight']:.2f} | "
            f"{(r['model_bytes'] or 0) / 1e6:.1f} | {r['quantize_seconds']:.1f}{'†' if r['calibrated_on'] else ''} | "
            f"{r['peak_memory_bytes'] / 1e6:.0f} | {r['windows']} |" for r in rows]
    elsewhere = sorted({r["calibrated_on"] for r in rows if r["calibrated_on"]})
    foot = [f"† calibrated on {', '.join(elsewhere)} and scored here: quantize s and peak MB are that machine's "
            "(peak GPU memory on a GPU)."] if elsewhere else []
    meta = [f"- {k}: {state[k]}" for k in ("model", "text", "seqlen", "calibration", "machine", "date") if k in state]
    cmds = state.get("commands") or ([state["command"]] if "command" in state else [])
    if cmds:   # no empty "command:" line for states made without one
        label = "commands (one run, then resumes)" if len(cmds) > 1 else "command"
        meta.append(f"- {label}: " + "; ".join(f"`{c}`" for c in cmds))
    return "\n".join([f"# {title}", "", *meta, "",
                      "Bits/weight: stored bytes of the quantized Linears (codes, scales, zeros) × 8 per weight; "
                      "the base counts as fp16 (16); for simulated formats (held dequantized, marked *) the "
                      "packed size of the format. ΔPPL, KL and top-1 are against the base on the same windows.",
                      "", *head, *body, *([""] + foot if foot else [])]) + "\n"


PLOT_INSTALL = "pip install 'lowbit[plot]'"


def can_plot() -> bool:
    """Whether matplotlib (the `plot` extra) is installed."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def plot(state: dict, path: str | Path, title: str) -> bool:
    """Perplexity against bits per weight, one line per method, the base as a horizontal line.
    False (and nothing written) when matplotlib, an optional extra, is not installed."""
    if not can_plot():
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(state)
    base = next(r for r in rows if r["config"] == "base")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list] = {}
    for r in rows:
        if r["config"] != "base":
            m = state["info"][r["config"]]["method"]
            kv = state["info"][r["config"]].get("kv_cache")
            gs = m.get("group_size")
            label = (m["method"] + ("" if gs is None else " per-channel" if gs == -1 else f" g{gs}")
                     + (" + LKD" if m.get("lkd_steps") else "") + (f" + KV {kv}" if kv else ""))
            by_method.setdefault(label, []).append((r["bits_per_weight"], r["perplexity"], r["config"]))
    for k, (label, pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^vPX*"[k % 8], color=plt.cm.tab20(k % 20),
                label=label)
    ax.axhline(base["perplexity"], color="k", ls="--", lw=1, label=f"base {base['perplexity']:.2f}")
    ax.set_xlabel("bits per weight (quantized Linears, incl. scales/zeros)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def run(base, candidates: list[Candidate], windows: torch.Tensor, calib, out_dir: str | Path, title: str,
        meta: dict, budget_s: float | None = None, device=None, progress: bool = True,
        seed: dict[str, tuple[dict, dict]] | None = None, cache_models: bool = False, write: bool = True) -> dict:
    """Build every candidate, score all of them in one pass over `windows`, write JSON + markdown + PNG
    (write_outputs; write=False leaves that to the caller, which adds its own sections).

    out_dir/state.json keeps the per-window sums: running again with the same windows resumes, and
    candidates already scored on every window are not built again. seed: {name: (results row, info)}
    taken over from another comparison on the same text and seqlen (the same config scored there).
    cache_models: keep calibrated methods' checkpoints in out_dir/models (see build).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    key = {"seqlen": int(windows.shape[1]), "text": meta.get("text")}
    if state and {k: state.get(k) for k in key} != key:
        from lowbit.errors import LowbitError
        raise LowbitError(f"{state_path}: made with other text/seqlen; remove it to start over")
    commands = state.get("commands", [])          # every run that added to this state (resumes)
    if meta.get("command") and meta["command"] not in commands:
        commands.append(meta["command"])
    state.update(meta, **key, total_windows=int(windows.shape[0]), base_bytes=model_bytes(base), commands=commands)
    state.setdefault("info", {})
    results = state.setdefault("results", {})
    take_over(state, seed)
    models = {}
    todo = [c for c in candidates if results.get(c.name, {}).get("windows", 0) < windows.shape[0]]
    bar = tqdm(todo, desc="quantize", unit="config", disable=not progress)
    for cand in bar:
        bar.set_postfix(config=cand.name)
        models[cand.name], info = build(base, cand, calib, device, progress=progress,  # per-block bar inside
                                        cache=out / "models" if cache_models else None)
        state["info"].setdefault(cand.name, info)  # keep the first run's cost figures when resuming
    score(base, models, windows, state, save=lambda s: write_json_atomic(state_path, s), budget_s=budget_s,
          progress=progress)
    if write:
        write_outputs(state, out, title)
    return state


def take_over(state: dict, seed: dict[str, tuple[dict, dict]] | None) -> dict:
    """Put seed's rows {name: (results row, info)} into state where they cover more windows (marked reused)."""
    results = state.setdefault("results", {})
    infos = state.setdefault("info", {})
    for name, (row, info) in (seed or {}).items():
        if row["windows"] > results.get(name, {}).get("windows", 0):
            results[name], infos[name] = dict(row), dict(info, reused=True)
    return state


def write_outputs(state: dict, out_dir: str | Path, title: str, extra_md: str = "",
                  extra_json: dict | None = None) -> None:
    """out_dir/compare.json (state + summary rows + extra_json), compare.md (table + extra_md), compare.png."""
    out = Path(out_dir)
    write_json_atomic(out / "compare.json", {**state, "rows": summary(state), **(extra_json or {})})
    write_text_atomic(out / "compare.md", markdown(state, title) + extra_md)
    plot(state, out / "compare.png", title)
