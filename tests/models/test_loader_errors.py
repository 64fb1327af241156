"""Every bad input to the loaders gives a one-line LowbitError naming the file and the problem."""
import json

import gguf
import numpy as np
import pytest
import torch

from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.models.loader import load


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _write_gguf(path, arch="llama", tensors=None, tokenizer=False):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
    for name, (arr, qtype) in (tensors or {"token_embd.weight": (np.ones((4, 8), np.float32), None)}).items():
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=qtype)  # arr: raw block bytes [rows, bytes per row]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_path(tmp_path):
    with pytest.raises(LowbitError) as e:
        load(tmp_path / "nope.gguf")
    assert "nope.gguf: no such file or directory" in _one_line(e)


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("hello")
    with pytest.raises(LowbitError) as e:
        load(p)
    assert "not a GGUF file" in _one_line(e) and "model.gguf" in str(e.value)


@pytest.mark.parametrize("nbytes", [4096, 50_000_000])
def test_truncated_gguf(tmp_path, default_path, nbytes):
    p = tmp_path / "trunc.gguf"
    with open(default_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(nbytes))
    with pytest.raises(LowbitError) as e:
        load(p)
    assert "trunc.gguf: truncated or corrupt GGUF file" in _one_line(e)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    _write_gguf(p, arch="gpt2")
    with pytest.raises(LowbitError) as e:
        load(p)
    assert "unsupported architecture 'gpt2'" in _one_line(e)


def test_unsupported_tensor_type(tmp_path):
    """Q8_K (llama.cpp's intermediate type) is one that even gguf.quants does not dequantize."""
    p = tmp_path / "q8k.gguf"
    raw = np.zeros((4, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]), np.uint8)
    _write_gguf(p, tensors={"token_embd.weight": (raw, gguf.GGMLQuantizationType.Q8_K)})
    with pytest.raises(LowbitError) as e:
        load(p, tokenizer=False)
    assert "token_embd.weight: unsupported GGUF tensor type Q8_K" in _one_line(e)


def test_gguf_missing_tensor_and_tokenizer(tmp_path):
    p = tmp_path / "partial.gguf"
    _write_gguf(p)
    with pytest.raises(LowbitError) as e:
        load(p, tokenizer=False)
    assert "partial.gguf: missing tensor" in _one_line(e)
    from lowbit.models.gguf_loader import gguf_tokenizer, open_gguf
    with pytest.raises(LowbitError) as e:
        gguf_tokenizer(open_gguf(p), p)
    assert "no tokenizer embedded" in _one_line(e)


@pytest.fixture
def hf_dir(tmp_path, smollm2):
    """A small real HF directory: random tiny Llama weights + SmolLM2's real tokenizer."""
    import transformers
    d = tmp_path / "hf"
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    smollm2[1].save_pretrained(d)
    return d


def test_hf_dir_loads(hf_dir):
    model, tok = load(hf_dir)
    assert tok("hello").input_ids and model(torch.tensor([[1, 2]])).shape == (1, 2, 49152)


def test_shape_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError) as e:
        load(hf_dir)
    assert "has shape (64, 32), config implies (48, 32)" in _one_line(e)


def test_missing_tokenizer(hf_dir):
    for f in hf_dir.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(LowbitError) as e:
        load(hf_dir)
    assert "no tokenizer files" in _one_line(e)


def test_corrupt_safetensors(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LowbitError) as e:
        load(hf_dir)
    assert "model.safetensors: truncated or corrupt safetensors file" in _one_line(e)


def test_pickle_only_refused(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(LowbitError) as e:
        load(hf_dir)
    assert "pickle checkpoints are not loaded" in _one_line(e)


def test_missing_config(hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(LowbitError) as e:
        load(hf_dir)
    assert "config.json: config file not found" in _one_line(e)


def test_cli_prints_one_line_error(tmp_path, capsys):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert main(["eval", str(p), "--text", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.gguf" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA GPU")
def test_cuda_device_without_gpu_is_a_one_line_error(smollm2, default_path):
    from lowbit.quant.api import quantize
    with pytest.raises(LowbitError, match="--device cuda: this machine has no CUDA GPU"):
        load(default_path, device="cuda")
    with pytest.raises(LowbitError, match="--device cuda:0: this machine has no CUDA GPU") as e:
        quantize(smollm2[0], "rtn", None, device="cuda:0", bits=4)
    _one_line(e)
