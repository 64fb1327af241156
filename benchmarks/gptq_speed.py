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

import torch

from lowbit.atomic import write_json_atomic
from lowbit.models.shapes import SHAPES, random_llama

def random_model(shape: str, blocks: int | None, dtype, device):
    """The shape's model with only `blocks` decoder blocks (all when None); also the full block count."""
    full_layers = SHAPES[shape]["num_layers"]
    model = random_llama(shape, dtype, device, **({"num_layers": blocks} if blocks else {}))
    return model, full_layers


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
        write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
