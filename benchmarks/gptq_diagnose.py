"""Why GPTQ gains less over RTN on SmolLM2 than in the GPTQ paper: the measurements.

Uses a GPTQ checkpoint the methods table calibrated (benchmarks/results/quant_methods/models/<row>/,
128 x 2048 WikiText-2 valid windows) and RTN with the same grid, on the real model:
  1. per-layer output error ||X Wqᵀ - X Wᵀ||² / ||X Wᵀ||² of both on the same calibration rows (what GPTQ
     minimises), RTN's through the same layer walk;
  2. the residual stream's relative error per position class after several blocks, and ΔNLL per token,
     on WikiText-2 test windows spread evenly over the text;
  3. on the same windows, ΔNLL split into KL(base || model) and the calibration term, and NLL against logit
     temperature: whether a row's ΔPPL is low because it is close to the base or because its change happens to
     point at the actual next tokens (a base that is over-confident on this text rewards flatter outputs);
  4. massive activations: per down_proj, max/mean of the Hessian diagonal and max |x| of its input.

    python benchmarks/gptq_diagnose.py --windows 2 --calib-windows 8
    python benchmarks/gptq_diagnose.py --row gptq-w4-g128 --windows 147 --calib-windows 8 --device cuda \
        --out benchmarks/results/gptq_diagnose_w4_g128
    python benchmarks/gptq_diagnose.py --report-only --out benchmarks/results/gptq_diagnose_w4_g128
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

from lowbit.atomic import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEPTHS = (5, 11, 20, 29)


def layer_errors(base, tok, gptq_report: dict, calib_path: str, n: int, options: dict) -> dict:
    """{kind: (mean RTN error, mean GPTQ error)} and per-layer ratios, on the walk's calibration rows."""
    from lowbit.quant.api import calibration_windows, quantize
    calib = calibration_windows(tok, calib_path, n, 2048, 0)
    rtn = quantize(copy.deepcopy(base), "rtn", calib, progress=True, **options).report.layers
    gp = {(r["block"], r["name"]): r["output_rel_mse"] for r in gptq_report["layers"]}
    kinds: dict[str, list] = {}
    ratios = []
    for r in rtn:
        g = gp[(r.block, r.name)]
        kinds.setdefault(r.name.split(".")[-1], []).append((r.output_rel_mse, g))
        ratios.append((g / r.output_rel_mse, f"{r.block}.{r.name}"))
    ratios.sort()
    return {"by_kind": {k: [sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)] for k, v in kinds.items()},
            "median_ratio": ratios[len(ratios) // 2][0], "worst": ratios[-3:], "best": ratios[:3]}


TEMPS = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5)   # logit temperatures for the confidence check
MIX = (1e-5, 1e-4, 1e-3, 1e-2)                   # weights of the uniform distribution mixed into the output
P_EDGES = (1e-4, 1e-3, 1e-2, 0.1, 0.5)           # buckets of the base's probability of the actual next token
CHUNK = 256                                      # positions per log-softmax (a [CHUNK, vocab] fp32 slab)


def _hidden_and_logits(m, ids: torch.Tensor):
    """ids [1, S] -> ({depth: residual stream [1, S, d]}, logits [S, V])."""
    hs, handles = {}, []
    for i in DEPTHS:
        handles.append(m.model.layers[i].register_forward_hook(
            lambda _m, _a, out, _i=i: hs.__setitem__(_i, out[0] if isinstance(out, tuple) else out)))
    logits = m(ids)[0]                                                         # [S, V]
    for h in handles:
        h.remove()
    return hs, logits


def _token_sums(lb: torch.Tensor, lq: torch.Tensor, y: torch.Tensor) -> dict:
    """Sums over positions of ΔNLL, KL(base || model), the entropy change, NLL at each temperature and mixed
    with the uniform distribution, and ΔNLL and token counts per bucket of the base's probability of y.

    lb, lq: base / model logits [S-1, V] predicting y [S-1]. ΔNLL = KL + Σ_v (t_v - p_v)(log p_v - log q_v)
    with t the one-hot of y: the second term is how far the model's change of log-probabilities points at the
    actual next token rather than at what the base expected; it is zero on average only where the base is
    calibrated on this text.
    """
    nb = len(P_EDGES) + 1
    out = {"dnll": 0.0, "kl": 0.0, "dent": 0.0, "nll_t": [0.0] * len(TEMPS), "nll_mix": [0.0] * len(MIX),
           "dnll_by_p": [0.0] * nb, "tokens_by_p": [0.0] * nb}
    edges = torch.tensor(P_EDGES, dtype=torch.float64, device=lb.device)
    for a in range(0, y.numel(), CHUNK):
        b, q, t = lb[a:a + CHUNK].double(), lq[a:a + CHUNK].double(), y[a:a + CHUNK, None]   # [c, V], [c, 1]
        logp, logq = torch.log_softmax(b, -1), torch.log_softmax(q, -1)
        d = logp - logq                                                        # [c, V]
        dy = d.gather(-1, t)[:, 0]                                              # [c] ΔNLL per token
        out["dnll"] += dy.sum().item()
        bucket = torch.bucketize(logp.gather(-1, t)[:, 0].exp(), edges)        # [c]
        out["dnll_by_p"] = [u + v for u, v in zip(out["dnll_by_p"],
                                                   torch.zeros(nb, dtype=torch.float64, device=dy.device)
                                                   .index_add_(0, bucket, dy).tolist())]
        out["tokens_by_p"] = [u + v for u, v in zip(out["tokens_by_p"], torch.bincount(bucket, minlength=nb).tolist())]
        lqy = logq.gather(-1, t)[:, 0]                                          # [c]
        for k, eps in enumerate(MIX):
            mixed = torch.logaddexp(lqy + math.log1p(-eps), torch.full_like(lqy, math.log(eps / q.shape[-1])))
            out["nll_mix"][k] -= mixed.sum().item()
        out["kl"] += (logp.exp() * d).sum().item()
        out["dent"] += ((logp.exp() * logp).sum(-1) - (logq.exp() * logq).sum(-1)).sum().item()
        for k, temp in enumerate(TEMPS):
            out["nll_t"][k] -= torch.log_softmax(q / temp, -1).gather(-1, t).sum().item()
    return out


@torch.no_grad()
def stream_errors(base, models: dict, ids: torch.Tensor) -> dict:
    """Per model, over the windows ids [W, S]: the residual stream's relative error after DEPTHS blocks
    (position 0 / 1-7 / the rest), ΔNLL split into KL + the calibration term, and NLL against temperature
    (also the base's own, under the name "base")."""
    from tqdm.auto import tqdm
    acc = {name: {"stream": {i: [0.0, 0.0, 0.0] for i in DEPTHS}, "sums": None} for name in models}
    acc["base"] = {"sums": None}
    n_tok = 0
    for w in tqdm(range(ids.shape[0]), desc="test windows", unit="win"):
        x, y = ids[w:w + 1], ids[w, 1:]                                        # [1, S], [S-1]
        hb, lb = _hidden_and_logits(base, x)
        n_tok += y.numel()
        todo = [("base", None, lb)] + [(n, *_hidden_and_logits(m, x)) for n, m in models.items()]
        for name, hm, lq in todo:
            s = _token_sums(lb[:-1], lq[:-1], y)
            a = acc[name]
            a["sums"] = s if a["sums"] is None else {k: ([u + v for u, v in zip(a["sums"][k], s[k])]
                                                         if isinstance(s[k], list) else a["sums"][k] + s[k]) for k in s}
            for i in DEPTHS if hm is not None else ():
                e = ((hm[i] - hb[i]).norm(dim=-1) / hb[i].norm(dim=-1))[0]    # [S]
                for j, part in enumerate((e[:1], e[1:8], e[8:])):
                    a["stream"][i][j] += part.mean().item() / ids.shape[0]
    base_t = [v / n_tok for v in acc["base"]["sums"]["nll_t"]]
    bs = acc["base"]["sums"]
    out = {"base_nll_by_temperature": dict(zip(map(str, TEMPS), base_t)),
           "base_nll_mixed_with_uniform": dict(zip(map(str, MIX), [v / n_tok for v in bs["nll_mix"]])),
           "token_share_by_base_p": [v / n_tok for v in bs["tokens_by_p"]], "base_p_edges": list(P_EDGES)}
    for name in models:
        s, st = acc[name]["sums"], acc[name]["stream"]
        nll_t = [v / n_tok for v in s["nll_t"]]
        k = min(range(len(TEMPS)), key=nll_t.__getitem__)
        out[name] = {"stream": {i: dict(zip(("pos0", "pos1_7", "rest"), st[i])) for i in DEPTHS},
                     "delta_nll": s["dnll"] / n_tok, "kl": s["kl"] / n_tok,
                     "calibration_term": (s["dnll"] - s["kl"]) / n_tok, "entropy_change": s["dent"] / n_tok,
                     "nll_by_temperature": dict(zip(map(str, TEMPS), nll_t)), "best_temperature": TEMPS[k],
                     "delta_nll_at_best_temperatures": nll_t[k] - min(base_t),
                     "nll_mixed_with_uniform": dict(zip(map(str, MIX), [v / n_tok for v in s["nll_mix"]])),
                     "delta_nll_by_base_p": [v / n_tok for v in s["dnll_by_p"]]}   # shares of the mean ΔNLL
    return out


@torch.no_grad()
def massive(base, tok, calib_path: str) -> list[dict]:
    """Per block: the down_proj input's largest Hessian-diagonal entry over the mean, and max |x|."""
    from lowbit.quant.api import calibration_windows
    ids = calibration_windows(tok, calib_path, 2, 2048, 0).windows.to(base.device)
    rows, handles = [], []
    for i, b in enumerate(base.model.layers):
        def hook(_m, args, _i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).double()              # [tokens, in]
            d = (x * x).mean(0)                                                # diag of H / 2
            rows.append({"block": _i, "max_over_mean_diag": (d.max() / d.mean()).item(),
                         "max_abs_x": x.abs().max().item(), "tokens_abs_x_gt_100": int((x.abs().amax(1) > 100).sum())})
        handles.append(b.mlp.down_proj.register_forward_pre_hook(hook))
    base(ids)
    for h in handles:
        h.remove()
    return rows


def markdown(res: dict) -> str:
    """The report of one diagnosis result (as written to its JSON)."""
    L, S = res["layers"], res["stream"]
    picked, total = res.get("test_windows"), res.get("total_windows")
    if picked is None:      # reports made before the windows were recorded: the first --windows of the text
        where = "the first test windows × 2048, see the command"
    elif total is not None and picked == list(range(total)):
        where = f"all {total} test windows × 2048"
    else:
        where = f"{len(picked)} test windows × 2048, windows {', '.join(map(str, picked))} of {total or '?'}"
    md = [f"# GPTQ vs RTN on SmolLM2: where the gain goes ({res['row']})", "",
          f"- date {res['date']}; {res['machine']}", f"- command: `{res['command']}`",
          *([f"- note: {res['note']}"] if res.get("note") else []), "",
          f"## 1. Per-layer output error on calibration rows (RTN: {res.get('calib_windows', 8)} windows, "
          "same walk)", "",
          "| layer | RTN | GPTQ | GPTQ / RTN |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {a:.2e} | {b:.2e} | {b / a:.2f} |" for k, (a, b) in L["by_kind"].items()]
    md += ["", f"Median per-layer ratio {L['median_ratio']:.2f}; worst: " +
           ", ".join(f"{n} {r:.2f}" for r, n in L["worst"]), "",
           f"## 2. Residual stream relative error and ΔNLL ({where})", "",
           "| model | " + " | ".join(f"after block {i} (pos 0 / 1-7 / rest)" for i in DEPTHS) + " | ΔNLL / token |",
           "|---|" + "---:|" * (len(DEPTHS) + 1)]
    models = [n for n in S if isinstance(S[n], dict) and "stream" in S[n]]
    for name in models:
        r = S[name]
        st = {int(k): v for k, v in r["stream"].items()}                       # JSON keeps the depths as strings
        cells = [f"{st[i]['pos0']:.3f} / {st[i]['pos1_7']:.3f} / {st[i]['rest']:.3f}" for i in DEPTHS]
        md.append(f"| {name} | " + " | ".join(cells) + f" | {r['delta_nll']:+.3f} |")
    if "base_nll_by_temperature" in S:   # reports made before section 3 existed lack it
        md += ["", "## 3. ΔNLL = KL(base ‖ model) + calibration term, and temperature (same windows)", "",
               "The calibration term Σ_v (t_v - p_v)(log p_v - log q_v) (t: one-hot of the next token, p: base, "
               "q: model)\nis the part of ΔNLL that comes from the direction of the change rather than its size; "
               "it averages to 0",
               "only where the base is calibrated on this text.", "",
               "| model | ΔNLL / token | KL(base ‖ model) | calibration term | entropy change | best T | "
               "ΔNLL, each at its best T |", "|---|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {n} | {S[n]['delta_nll']:+.4f} | {S[n]['kl']:.4f} | {S[n]['calibration_term']:+.4f} | "
               f"{S[n]['entropy_change']:+.4f} | {S[n]['best_temperature']} | "
               f"{S[n]['delta_nll_at_best_temperatures']:+.4f} |" for n in models]
        md += ["", "NLL per token against logit temperature T:", "",
               "| model | " + " | ".join(f"T={t}" for t in TEMPS) + " |", "|---|" + "---:|" * len(TEMPS),
               "| base | " + " | ".join(f"{v:.4f}" for v in S["base_nll_by_temperature"].values()) + " |"]
        md += [f"| {n} | " + " | ".join(f"{v:.4f}" for v in S[n]["nll_by_temperature"].values()) + " |" for n in models]
        md += ["", "NLL per token with the output mixed with the uniform distribution, (1 - ε) q + ε / V:", "",
               "| model | " + " | ".join(f"ε={e:g}" for e in MIX) + " |", "|---|" + "---:|" * len(MIX),
               "| base | " + " | ".join(f"{v:.4f}" for v in S["base_nll_mixed_with_uniform"].values()) + " |"]
        md += [f"| {n} | " + " | ".join(f"{v:.4f}" for v in S[n]["nll_mixed_with_uniform"].values()) + " |"
               for n in models]
        edges = ("0",) + tuple(f"{e:g}" for e in P_EDGES) + ("1",)
        cols = [f"p in [{a}, {b})" for a, b in zip(edges, edges[1:])]
        md += ["", "ΔNLL per token by the base's probability p of the actual next token (each bucket's contribution "
               "to the mean; the buckets sum to ΔNLL):", "",
               "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols),
               "| share of tokens | " + " | ".join(f"{100 * v:.1f}%" for v in S["token_share_by_base_p"]) + " |"]
        md += [f"| {n} | " + " | ".join(f"{v:+.4f}" for v in S[n]["delta_nll_by_base_p"]) + " |" for n in models]
    md += ["", "## 4. Massive activations at down_proj inputs (2 calibration windows)", "",
           "| block | max / mean Hessian diagonal | max abs x | tokens with abs x > 100 |", "|---:|---:|---:|---:|"]
    md += [f"| {r['block']} | {r['max_over_mean_diag']:.0f} | {r['max_abs_x']:.1f} | {r['tokens_abs_x_gt_100']} |"
           for r in res["massive"] if r["max_over_mean_diag"] > 150]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="gptq-w4-ch", help="a calibrated row of the methods table")
    ap.add_argument("--windows", type=int, default=2, help="WikiText-2 test windows for the stream errors")
    ap.add_argument("--calib-windows", type=int, default=8, help="calibration windows for RTN's layer errors")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gptq_diagnose"))
    ap.add_argument("--model", default=None, help="the base model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report-only", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.report_only:
        src = Path(args.out).with_suffix(".json")
        if not src.is_file():
            sys.exit(f"error: --report-only: {src} does not exist")
        write_text_atomic(Path(args.out).with_suffix(".md"), markdown(json.loads(src.read_text())))
        return

    from lowbit.text import eval_windows, read_text, tokenize_text
    from lowbit.models.loader import load
    from lowbit.quant.api import quantize

    ckpt = ROOT / "benchmarks" / "results" / "quant_methods" / "models" / args.row
    if not (ckpt / "build_info.json").is_file():
        sys.exit(f"error: --row {args.row}: no calibrated checkpoint at {ckpt} (run benchmarks/quant_table.py "
                 f"--set methods --configs {args.row} first)")
    info = json.loads((ckpt / "build_info.json").read_text())
    m = info["method"]
    options = {"bits": m["bits"], "group_size": m["group_size"], "sym": m["sym"]}
    calib_path = str(SHARED / "wikitext-2" / "valid.txt")
    base, tok = load(args.model, device=args.device)
    gptq, _ = load(ckpt, dtype=base.dtype, device=args.device, tokenizer=False)
    rtn = copy.deepcopy(base)
    quantize(rtn, "rtn", None, progress=False, **options)
    all_ids = eval_windows(tokenize_text(tok, read_text(SHARED / "wikitext-2-raw" / "wiki.test.raw")), 2048)
    picked = torch.linspace(0, all_ids.shape[0] - 1, args.windows).round().long().unique()   # spread over the text
    ids = all_ids[picked].to(args.device)                                      # [W, 2048]
    res = {"row": args.row, "method": m, "date": datetime.date.today().isoformat(),
           "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                       f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads") +
                      f", torch {torch.__version__}",
           "command": "python " + " ".join(sys.argv), "test_windows": picked.tolist(),
           "total_windows": all_ids.shape[0], "calib_windows": args.calib_windows,
           "layers": layer_errors(base, tok, json.loads((ckpt / "quant_report.json").read_text()), calib_path,
                                  args.calib_windows, options),
           "stream": stream_errors(base, {"rtn": rtn, "gptq": gptq}, ids),
           "massive": massive(base, tok, calib_path)}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), res)
    write_text_atomic(out.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
