"""GPTQ wall time and peak memory through the layer walk, with random-initialised weights at real shapes.

Builds the architecture with random weights (real weights are not available on the GPU machine), feeds
N random calibration windows of S tokens through the one layer walk with GPTQ, and reports time per block
and peak memory; the whole model's time is extrapolated from the blocks measured.

    python benchmarks/gptq_speed.py --shape llama3-8b --blocks 1 --nsamples 128 --seqlen 2048 --device cuda
    python benchmarks/gptq_speed.py --shape smollm2 --nsamples 128 --seqlen 2048 --device cpu
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from lowbit.config import ModelConfig

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
}


def random_model(shape: str, blocks: int | None, dtype, device):
    from lowbit.models.llama import LlamaForCausalLM

    kw = dict(SHAPES[shape])
    full_layers = kw["num_layers"]
    if blocks:
        kw["num_layers"] = blocks
    cfg = ModelConfig(**kw, name=shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random normal weights at the usual 1/sqrt(fan_in) scale, never zeros
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    model.init_rope(device)
    return model.to(dtype).eval(), full_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--blocks", type=int, default=None, help="build only this many blocks (extrapolate the rest)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file for the result")
    args = ap.parse_args()

    from lowbit.models.loader import resolve_dtype
    from lowbit.quant.api import Calibration, quantize

    model, full_layers = random_model(args.shape, args.blocks, resolve_dtype(args.dtype), args.device)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = quantize(model, "gptq", Calibration(windows, "random token ids", 0), device=args.device, progress=True, bits=args.bits, group_size=args.group_size,
                   act_order=args.act_order)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    n_blocks = model.config.num_layers
    out = {
        "shape": args.shape, "blocks_measured": n_blocks, "model_blocks": full_layers,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "bits": args.bits, "group_size": args.group_size,
        "act_order": args.act_order, "dtype": args.dtype, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "seconds_measured": total, "seconds_per_block": total / n_blocks,
        "seconds_whole_model_extrapolated": total / n_blocks * full_layers,
        "peak_memory_bytes": res.report.peak_memory_bytes,
        "calibration_activation_bytes_cpu": args.nsamples * args.seqlen * model.config.hidden_size
        * torch.finfo(model.dtype).bits // 8,
        "block_weight_bytes": block_bytes,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "command": "python benchmarks/gptq_speed.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
