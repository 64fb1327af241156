"""Why GPTQ per-channel W4 gains less over RTN on SmolLM2 than in the GPTQ paper: the measurements.

Uses the GPTQ checkpoint the methods table calibrated (benchmarks/results/quant_methods/models/<row>/,
128 x 2048 WikiText-2 valid windows) and RTN with the same grid, on the real model:
  1. per-layer output error ||X Wqᵀ - X Wᵀ||² / ||X Wᵀ||² of both on the same calibration rows (what GPTQ
     minimises), RTN's through the same layer walk;
  2. the residual stream's relative error per position class after several blocks, and ΔNLL per token,
     on the first WikiText-2 test windows;
  3. massive activations: per down_proj, max/mean of the Hessian diagonal and max |x| of its input.

    python benchmarks/gptq_diagnose.py --windows 2 --calib-windows 8
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
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


@torch.no_grad()
def stream_errors(base, models: dict, ids: torch.Tensor) -> dict:
    """Relative error of the residual stream after DEPTHS blocks (position 0 / 1-7 / the rest) and ΔNLL."""
    def run(m):
        hs, handles = {}, []
        for i in DEPTHS:
            handles.append(m.model.layers[i].register_forward_hook(
                lambda _m, _a, out, _i=i: hs.__setitem__(_i, out[0] if isinstance(out, tuple) else out)))
        logits = m(ids)                                                        # [B, S, V]
        for h in handles:
            h.remove()
        nll = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]   # [B, S-1]
        return hs, nll
    hb, nb = run(base)
    out = {}
    for name, m in models.items():
        hm, nm = run(m)
        rows = {}
        for i in DEPTHS:
            e = (hm[i] - hb[i]).norm(dim=-1) / hb[i].norm(dim=-1)              # [B, S]
            rows[i] = {"pos0": e[:, 0].mean().item(), "pos1_7": e[:, 1:8].mean().item(), "rest": e[:, 8:].mean().item()}
        out[name] = {"stream": rows, "delta_nll": (nm - nb).mean().item()}
    return out


@torch.no_grad()
def massive(base, tok, calib_path: str) -> list[dict]:
    """Per block: the down_proj input's largest Hessian-diagonal entry over the mean, and max |x|."""
    from lowbit.quant.api import calibration_windows
    ids = calibration_windows(tok, calib_path, 2, 2048, 0).windows
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="gptq-w4-ch", help="a calibrated row of the methods table")
    ap.add_argument("--windows", type=int, default=2, help="WikiText-2 test windows for the stream errors")
    ap.add_argument("--calib-windows", type=int, default=8, help="calibration windows for RTN's layer errors")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gptq_diagnose"))
    args = ap.parse_args()

    from lowbit.eval.text import eval_windows, read_text, tokenize_text
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
    base, tok = load(None)
    gptq, _ = load(ckpt, dtype=base.dtype, tokenizer=False)
    rtn = copy.deepcopy(base)
    quantize(rtn, "rtn", None, progress=False, **options)
    ids = eval_windows(tokenize_text(tok, read_text(SHARED / "wikitext-2-raw" / "wiki.test.raw")), 2048, args.windows)
    res = {"row": args.row, "method": m, "date": datetime.date.today().isoformat(),
           "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, "
                      f"torch {torch.__version__}",
           "command": "python " + " ".join(sys.argv),
           "layers": layer_errors(base, tok, json.loads((ckpt / "quant_report.json").read_text()), calib_path,
                                  args.calib_windows, options),
           "stream": stream_errors(base, {"rtn": rtn, "gptq": gptq}, ids),
           "massive": massive(base, tok, calib_path)}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), res)
    L, S = res["layers"], res["stream"]
    md = [f"# GPTQ vs RTN on SmolLM2: where the gain goes ({args.row})", "",
          f"- date {res['date']}; {res['machine']}", f"- command: `{res['command']}`", "",
          f"## 1. Per-layer output error on calibration rows (RTN: {args.calib_windows} windows, same walk)", "",
          "| layer | RTN | GPTQ | GPTQ / RTN |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {a:.2e} | {b:.2e} | {b / a:.2f} |" for k, (a, b) in L["by_kind"].items()]
    md += ["", f"Median per-layer ratio {L['median_ratio']:.2f}; worst: " +
           ", ".join(f"{n} {r:.2f}" for r, n in L["worst"]), "",
           f"## 2. Residual stream relative error and ΔNLL ({args.windows} test windows × 2048)", "",
           "| model | " + " | ".join(f"after block {i} (pos 0 / 1-7 / rest)" for i in DEPTHS) + " | ΔNLL / token |",
           "|---|" + "---:|" * (len(DEPTHS) + 1)]
    for name, r in S.items():
        cells = [f"{r['stream'][i]['pos0']:.3f} / {r['stream'][i]['pos1_7']:.3f} / {r['stream'][i]['rest']:.3f}"
                 for i in DEPTHS]
        md.append(f"| {name} | " + " | ".join(cells) + f" | {r['delta_nll']:+.3f} |")
    md += ["", "## 3. Massive activations at down_proj inputs (2 calibration windows)", "",
           "| block | max / mean Hessian diagonal | max abs x | tokens with abs x > 100 |", "|---:|---:|---:|---:|"]
    md += [f"| {r['block']} | {r['max_over_mean_diag']:.0f} | {r['max_abs_x']:.1f} | {r['tokens_abs_x_gt_100']} |"
           for r in res["massive"] if r["max_over_mean_diag"] > 150]
    write_text_atomic(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
