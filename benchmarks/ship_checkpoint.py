"""Move a calibrated lowbit checkpoint between this machine and the GPU machine within the device tool's limits.

The device tool returns at most 8 files of 16 MiB each (64 MiB in all), and a SmolLM2 checkpoint is ~170 MB,
two thirds of it the fp32 embedding that no weight method changes. So:

    pack CKPT OUT [--model GGUF]     tensors of CKPT that are not bit-identical to the base model's, in
                                     safetensors shards of at most --shard-mib, plus pack.json (CKPT's JSON
                                     files, the shards' sha256, the names and sha256 of the tensors left
                                     out, the machine)
    unpack PACK DEST [--model GGUF]  CKPT rebuilt at DEST (atomically), the left-out tensors taken from the
                                     base model after checking their sha256; build_info.json records where
                                     the calibration ran ("calibrated_on")

    python benchmarks/ship_checkpoint.py unpack /work/.device/N benchmarks/results/quant_methods/models/awq-w4-g128
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

from lowbit.atomic import atomic_dir

MIB = 1 << 20


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _base_tensors(model_path: str | None) -> dict[str, torch.Tensor]:
    from lowbit.models.loader import load
    base, _ = load(model_path, tokenizer=False)
    return {k: v.detach().contiguous() for k, v in base.state_dict().items()}


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def pack(ckpt: Path, out: Path, model_path: str | None, shard_mib: float) -> None:
    """Shards of the tensors that differ from the base, and pack.json."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    base = _base_tensors(model_path)
    # the base's tensor in the dtype it was saved in (16-bit for tensors the method left alone)
    left_out = {k: _sha(v) for k, v in tensors.items()
                if k in base and torch.equal(base[k].to(v.dtype), v)}
    left_dtype = {k: str(tensors[k].dtype).removeprefix("torch.") for k in left_out}
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        if k in left_out:
            continue
        n = v.numel() * v.element_size()
        if cur and size + n > shard_mib * MIB:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + n
    if cur:
        shards.append(cur)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, shard in enumerate(shards):
        names.append(f"shard{i}.safetensors")
        save_file(shard, str(out / names[-1]), metadata={"format": "pt"})
    meta = {"json": {p.name: json.loads(p.read_text()) for p in sorted(ckpt.glob("*.json"))},
            "shards": names, "shard_sha256": [hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names],
            "left_out_sha256": left_out, "left_out_dtype": left_dtype, "machine": _machine()}
    (out / "pack.json").write_text(json.dumps(meta))
    print(f"packed {len(tensors) - len(left_out)} tensors in {len(names)} shards; {len(left_out)} left out "
          f"(bit-identical to the base's)")


def unpack(pack_dir: Path, dest: Path, model_path: str | None) -> None:
    """Rebuild the checkpoint at dest from the shards and the base model; refuse on any mismatch."""
    from safetensors.torch import load_file, save_file

    meta_path = pack_dir / "pack.json"
    if not meta_path.is_file():
        sys.exit(f"error: {pack_dir}: no pack.json (not made by `ship_checkpoint.py pack`)")
    meta = json.loads(meta_path.read_text())
    tensors = {}
    for name, sha in zip(meta["shards"], meta.get("shard_sha256", [None] * len(meta["shards"]))):
        if not (pack_dir / name).is_file():
            sys.exit(f"error: {pack_dir}: shard {name} is missing")
        if sha is not None and hashlib.sha256((pack_dir / name).read_bytes()).hexdigest() != sha:
            sys.exit(f"error: {pack_dir / name}: sha256 differs from pack.json's (a broken transfer?)")
        tensors.update(load_file(str(pack_dir / name)))
    base = _base_tensors(model_path)
    dtypes = meta.get("left_out_dtype", {})
    for k, sha in meta["left_out_sha256"].items():
        if k in base and k in dtypes:
            base[k] = base[k].to(getattr(torch, dtypes[k]))
        if k not in base or _sha(base[k]) != sha:
            sys.exit(f"error: {meta_path}: tensor {k} of the base model here differs from the one it was packed "
                     f"against (another model file?)")
        tensors[k] = base[k]
    with atomic_dir(dest) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, obj in meta["json"].items():
            if name == "build_info.json":
                obj = dict(obj, calibrated_on=meta["machine"])
            (tmp / name).write_text(json.dumps(obj, indent=2))
    print(f"wrote {dest} ({len(tensors)} tensors; calibrated on {meta['machine']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("ckpt", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--shard-mib", type=float, default=15.0)
    u = sub.add_parser("unpack")
    u.add_argument("pack", type=Path)
    u.add_argument("dest", type=Path)
    for q in (p, u):
        q.add_argument("--model", default=None, help="the base model (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    if args.cmd == "pack":
        if not (args.ckpt / "model.safetensors").is_file():
            sys.exit(f"error: {args.ckpt}: no model.safetensors (not a lowbit checkpoint)")
        pack(args.ckpt, args.out, args.model, args.shard_mib)
    else:
        unpack(args.pack, args.dest, args.model)


if __name__ == "__main__":
    main()
