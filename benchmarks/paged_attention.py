"""Triton paged decode attention vs SDPA on a contiguous cache: one layer, Llama-3-8B heads, on a GPU.

32 query heads / 8 KV heads, head_dim 128, block 16; batch x context sweep; KV cache bf16 / int8 / fp8.
The paged pools hold the same K/V as the contiguous bf16 cache, scattered by a random permutation of the
pool; the baseline is F.scaled_dot_product_attention on the contiguous cache, the faster of native GQA
([B, n_kv, S, hd], enable_gqa) and K/V expanded to every query head ([B, H, S, hd]).
Bytes read = K+V codes + scales + q + block table; bandwidth is compared with a device copy measured in
the same run. Working sets under the L2 size (50 MB on H100) stay cached across timed iterations, so
their "bandwidth" can exceed HBM's: read those rows as latency.

    python benchmarks/paged_attention.py            # -> benchmarks/results/paged_attention_h100.{json,md}
    python benchmarks/paged_attention.py --quick    # smoke run -> ..._quick.{json,md}
    python benchmarks/paged_attention.py --sweep    # also time a few (BLOCK_N, warps, stages) configs
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ceilings import ceilings, copy_bandwidth, cuda_time, machine, write_results
from lowbit.kernels.paged_attention_ref import paged_attention
from lowbit.kernels.paged_attention import auto_num_splits, paged_decode_attention
from lowbit.layers.kv_quant import KVQuant

H, N_KV, HD, BS = 32, 8, 128, 16
KV_KINDS = ("bf16", "int8", "fp8")
OUT = Path(__file__).parent / "results" / "paged_attention_h100"


def contiguous_cache(B: int, S: int, g: torch.Generator):
    """q [B, H, hd], K, V [B, n_kv, S, hd] bf16 on the GPU."""
    q = torch.randn(B, H, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, N_KV, S, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, N_KV, S, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def to_pool(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """[B, n_kv, S, hd] -> pool [B*S/bs, n_kv, bs, hd] with logical block i of the batch at perm[i]."""
    B, n_kv, S, hd = x.shape
    blocks = x.view(B, n_kv, S // BS, BS, hd).permute(0, 2, 1, 3, 4).reshape(B * S // BS, n_kv, BS, hd)
    pool = torch.empty_like(blocks)
    pool[perm] = blocks
    return pool


def time_sdpa(q4, k, v, iters: int, **kw) -> tuple[float, torch.Tensor]:
    """(median seconds, output [B, H, hd] float32) of SDPA for q4 [B, H, 1, hd] over k, v [B, *, S, hd]."""
    def fn():
        return F.scaled_dot_product_attention(q4, k, v, **kw)
    return cuda_time(fn, iters=iters), fn()[:, :, 0].float()


def sdpa_baseline(q, k, v, iters: int) -> dict:
    """The faster of SDPA with native GQA (flash backend) and SDPA on K/V expanded to all H heads (any
    backend; the expansion is not timed) for q [B, H, hd] over k, v [B, n_kv, S, hd]."""
    q4 = q[:, :, None]                                                          # [B, H, 1, hd]
    runs = {}                                                                   # mode -> (s, bytes, out)
    try:
        runs["gqa"] = (*time_sdpa(q4, k, v, iters, enable_gqa=True), k.nbytes + v.nbytes)
    except (TypeError, RuntimeError) as e:                                      # older torch / no backend
        print(f"SDPA enable_gqa unavailable: {str(e)[:80]}")
    ke, ve = k.repeat_interleave(H // N_KV, 1), v.repeat_interleave(H // N_KV, 1)  # [B, H, S, hd]
    runs["expanded"] = (*time_sdpa(q4, ke, ve, iters), ke.nbytes + ve.nbytes)
    del ke, ve
    mode = min(runs, key=lambda m: runs[m][0])
    t, out, nbytes = runs[mode]
    return {"mode": mode, "t": t, "GBps": (nbytes + q.nbytes) / t / 1e9, "out": out,
            "us_by_mode": {m: r[0] * 1e6 for m, r in runs.items()}}


def fits(B: int, S: int) -> bool:
    """Room for the contiguous cache and the pools (bf16 K+V each), float32 temporaries of one pool while
    quantizing (~2x), and the GQA-expanded cache SDPA is also timed on (4x at rep 4): ~8x the bf16 K+V."""
    kv = 2 * B * S * N_KV * HD * 2                                               # bf16 K + V bytes
    need = 8 * kv
    return need < 0.8 * torch.cuda.mem_get_info()[0]


def quantized_pools(kind: str, k_pool: torch.Tensor, v_pool: torch.Tensor) -> tuple:
    """(k, v, k_scale, v_scale): the bf16 pools as they are, or int8/fp8 codes with [.., bs, 1] scales."""
    if kind == "bf16":
        return k_pool, v_pool, None, None
    quant = KVQuant(kind)
    (kc, ks), (vc, vs) = quant.quantize(k_pool), quant.quantize(v_pool)
    return kc, vc, ks, vs


def time_kernel(q, pools, bt, ctx, ref, iters: int, timed_one_split: bool) -> dict:
    """Kernel time, bytes read and error vs ref for pools (k, v, k_scale, v_scale); optionally also 1 split."""
    kp, vp, ks, vs = pools

    def fn(n=None):
        return paged_decode_attention(q, kp, vp, bt, ctx, k_scale=ks, v_scale=vs, num_splits=n)

    err = (fn().float() - ref).abs().max().item()
    t = cuda_time(fn, iters=iters)
    nbytes = kp.nbytes + vp.nbytes + (ks.nbytes + vs.nbytes if ks is not None else 0) + q.nbytes + bt.nbytes
    row = {"us": t * 1e6, "bytes": nbytes, "GBps": nbytes / t / 1e9, "max_err_vs_sdpa": err}
    if timed_one_split:                                                     # what splitting buys
        row["us_one_split"] = cuda_time(lambda: fn(1), iters=iters) * 1e6
    return row


def bench_case(B: int, S: int, copy_Bps: float, iters: int, g: torch.Generator) -> list[dict]:
    q, k, v = contiguous_cache(B, S, g)
    sdpa = sdpa_baseline(q, k, v, iters)
    ref, t_sdpa = sdpa.pop("out"), sdpa["t"]                                    # ref [B, H, hd] float32
    perm = torch.randperm(B * S // BS, device="cuda", generator=g)
    bt = perm.view(B, S // BS).to(torch.int32)                                   # [B, MB]
    ctx = torch.full((B,), S, dtype=torch.int32, device="cuda")
    k_pool, v_pool = to_pool(k, perm), to_pool(v, perm)
    del k, v
    splits = auto_num_splits(B, N_KV, S, torch.cuda.get_device_properties(0).multi_processor_count)
    rows = []
    for kind in KV_KINDS:
        pools = quantized_pools(kind, k_pool, v_pool)
        row = time_kernel(q, pools, bt, ctx, ref, iters, timed_one_split=splits > 1 and kind == "bf16")
        row.update(batch=B, context=S, kv=kind, splits=splits, frac_copy=row["GBps"] * 1e9 / copy_Bps,
                   sdpa_us=t_sdpa * 1e6, speedup_vs_sdpa=t_sdpa * 1e6 / row["us"], sdpa_mode=sdpa["mode"],
                   sdpa_GBps=sdpa["GBps"], sdpa_us_by_mode=sdpa["us_by_mode"])
        rows.append(row)
        print(f"B={B:4d} ctx={S:5d} {kind:4s} splits={splits:2d} {row['us']:9.1f} us "
              f"{row['GBps']:7.0f} GB/s ({100 * row['frac_copy']:4.0f}% copy)  SDPA {row['sdpa_us']:9.1f} us "
              f"x{row['speedup_vs_sdpa']:.2f}  err {row['max_err_vs_sdpa']:.1e}", flush=True)
        del pools
    del k_pool, v_pool
    torch.cuda.empty_cache()
    return rows


def bench_reference(B: int, S: int, iters: int, g: torch.Generator) -> dict:
    """The PyTorch gather path (lowbit.kernels.paged_attention_ref) on one small case, for scale."""
    q, k, v = contiguous_cache(B, S, g)
    perm = torch.randperm(B * S // BS, device="cuda", generator=g)
    kp, vp = to_pool(k, perm), to_pool(v, perm)
    bt = perm.view(B, S // BS).to(torch.int32)
    ctx = torch.full((B,), S, dtype=torch.int32, device="cuda")
    t_ref = cuda_time(lambda: paged_attention(q[:, :, None], kp, vp, bt, ctx), iters=iters)
    t_ker = cuda_time(lambda: paged_decode_attention(q, kp, vp, bt, ctx), iters=iters)
    print(f"reference gather B={B} ctx={S}: {t_ref * 1e6:.0f} us vs kernel {t_ker * 1e6:.1f} us", flush=True)
    return dict(batch=B, context=S, reference_us=t_ref * 1e6, kernel_us=t_ker * 1e6, speedup=t_ref / t_ker)


def bench_sweep(B: int, S: int, iters: int, g: torch.Generator) -> list[dict]:
    """Time each (BLOCK_N, num_warps, num_stages) on one case, bf16 and int8, with the automatic splits."""
    q, k, v = contiguous_cache(B, S, g)
    perm = torch.randperm(B * S // BS, device="cuda", generator=g)
    kp, vp = to_pool(k, perm), to_pool(v, perm)
    del k, v
    bt = perm.view(B, S // BS).to(torch.int32)
    ctx = torch.full((B,), S, dtype=torch.int32, device="cuda")
    rows = []
    for kind in ("bf16", "int8"):
        args = quantized_pools(kind, kp, vp)
        for cfg in [(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]:
            def fn(cfg=cfg, a=args):
                return paged_decode_attention(q, a[0], a[1], bt, ctx, k_scale=a[2], v_scale=a[3], config=cfg)
            try:
                us = cuda_time(fn, iters=iters) * 1e6
            except Exception as e:  # noqa: BLE001  (e.g. Triton's OutOfResources for a big config)
                us = None
                print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
            rows.append(dict(batch=B, context=S, kv=kind, config=list(cfg), us=us))
            print(f"sweep B={B} ctx={S} {kind} config={cfg}: {us if us is None else round(us, 1)} us", flush=True)
    return rows


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = ["# Paged decode attention (Triton) vs SDPA, one layer", "",
             f"{m['gpu']} · torch {m['torch']} · triton {m['triton']} · {m['date']} · `{m['command']}`", "",
             (f"H={H} query heads, {N_KV} KV heads, head_dim {HD}, block {BS}; block tables are random "
              f"permutations of the pool. Copy bandwidth measured now: {payload['ceilings']['copy_GBps']:.0f} GB/s. "
              f"Bytes = K+V codes + scales + q + block table. Speed-up is against SDPA on a contiguous bf16 cache "
              f"(same query). Rows whose data fits in L2 can beat the copy bandwidth."), "",
             ("| batch | context | KV | splits | µs | MB read | GB/s | % copy BW | SDPA µs (mode) | vs SDPA "
              "| 1-split µs | max err vs SDPA |"),
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        one = f"{r['us_one_split']:.1f}" if "us_one_split" in r else ""
        lines.append(f"| {r['batch']} | {r['context']} | {r['kv']} | {r['splits']} | {r['us']:.1f} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['GBps']:.0f} | {100 * r['frac_copy']:.0f}% | "
                     f"{r['sdpa_us']:.1f} ({r['sdpa_mode']}) | "
                     f"{r['speedup_vs_sdpa']:.2f}x | {one} | {r['max_err_vs_sdpa']:.1e} |")
    ref = payload.get("reference")
    if ref:
        lines += ["", (f"Reference PyTorch gather path (B={ref['batch']}, context {ref['context']}, bf16): "
                       f"{ref['reference_us']:.0f} µs vs kernel {ref['kernel_us']:.1f} µs ({ref['speedup']:.0f}x).")]
    if payload.get("sweep"):
        lines += ["", "| batch | context | KV | BLOCK_N, warps, stages | µs |", "|---:|---:|---|---|---:|"]
        for r in payload["sweep"]:
            us = "failed" if r["us"] is None else f"{r['us']:.1f}"
            lines.append(f"| {r['batch']} | {r['context']} | {r['kv']} | {tuple(r['config'])} | {us} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (2 cases), writes *_quick")
    ap.add_argument("--sweep", action="store_true", help="also time a few kernel configs on two cases")
    ap.add_argument("--out", type=Path, default=None, help="results path without suffix")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/paged_attention.py needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    batches, contexts, iters = ((1, 8), (512,), 5) if args.quick else ((1, 8, 32, 128), (512, 2048, 8192), 20)
    ceil = {"copy_GBps": copy_bandwidth(256 << 20) / 1e9} if args.quick else ceilings()
    print(f"copy bandwidth {ceil['copy_GBps']:.0f} GB/s", flush=True)
    rows = []
    for B in batches:
        for S in contexts:
            if not fits(B, S):
                print(f"B={B} ctx={S}: skipped (memory)")
                continue
            rows += bench_case(B, S, ceil["copy_GBps"] * 1e9, iters, g)
    payload = dict(machine=machine(), ceilings=ceil, shape=dict(heads=H, kv_heads=N_KV, head_dim=HD, block=BS),
                   rows=rows, reference=bench_reference(8, 512 if args.quick else 2048, iters, g))
    if args.sweep:
        payload["sweep"] = bench_sweep(1, 8192, iters, g) + bench_sweep(32, 2048, iters, g)
    out = args.out or (OUT.with_name(OUT.name + "_quick") if args.quick else OUT)
    write_results(out, payload, markdown(payload))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
