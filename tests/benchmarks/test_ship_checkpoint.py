"""benchmarks/ship_checkpoint.py on a real quantized SmolLM2 checkpoint: pack leaves out the tensors the
base already has, unpack rebuilds the checkpoint byte for byte and refuses a damaged shard."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ship_checkpoint  # noqa: E402

from lowbit.quant.api import quantize  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(smollm2, default_path, tmp_path_factory):
    model = copy.deepcopy(smollm2[0])
    res = quantize(model, "rtn", None, progress=False, bits=4, group_size=128)
    out = tmp_path_factory.mktemp("ship") / "rtn"
    res.save(model, None, out)
    return out


def test_round_trip_is_byte_identical(ckpt, default_path, tmp_path):
    pack, dest = tmp_path / "pack", tmp_path / "dest"
    ship_checkpoint.pack(ckpt, pack, str(default_path), shard_mib=15)
    meta = json.loads((pack / "pack.json").read_text())
    assert "model.embed_tokens.weight" in meta["left_out_sha256"]   # the embedding: unchanged by RTN (saved fp16)
    assert not any(k.endswith("qweight") for k in meta["left_out_sha256"])
    assert all((pack / n).stat().st_size <= 15 * ship_checkpoint.MIB for n in meta["shards"])
    ship_checkpoint.unpack(pack, dest, str(default_path))
    assert (dest / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    for p in ckpt.glob("*.json"):
        assert json.loads((dest / p.name).read_text()) == json.loads(p.read_text())


def test_damaged_shard_is_refused(ckpt, default_path, tmp_path):
    pack = tmp_path / "pack"
    ship_checkpoint.pack(ckpt, pack, str(default_path), shard_mib=15)
    shard = pack / json.loads((pack / "pack.json").read_text())["shards"][0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256 differs"):
        ship_checkpoint.unpack(pack, tmp_path / "dest", str(default_path))
    assert not (tmp_path / "dest").exists()
