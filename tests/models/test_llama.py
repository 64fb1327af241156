"""Our decoder against transformers on the same weights."""
import pytest
import torch

from lowbit.config import ModelConfig
from lowbit.models.loader import load

# fp32 on CPU: our forward and transformers' run the same ops in the same order, so on SmolLM2 they agree
# to the bit (measured max |Δ| = 0.0 over 512 tokens, logits up to |38|). The bound leaves room for a
# different SDPA backend or BLAS blocking: 1e-4 is ~3 fp32 ulps at the logits' magnitude.
LOGIT_TOL = 1e-4


def test_logits_match_transformers_on_gguf(smollm2, hf_smollm2, wiki_ids):
    model, _ = smollm2
    ids = wiki_ids[:384].view(2, 192)                                   # [B=2, T=192]
    with torch.no_grad():
        ours, ref = model(ids), hf_smollm2(ids).logits
    assert ref.abs().max() > 10                                         # real, non-trivial logits
    assert (ours - ref).abs().max().item() < LOGIT_TOL


def test_weights_match_transformers_gguf_loader(smollm2, hf_smollm2):
    """Same names, same values: our q/k un-permutation and dequantization equal transformers' own."""
    ours, ref = smollm2[0].state_dict(), hf_smollm2.state_dict()
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        assert torch.equal(ours[name], ref[name]), name


def _tiny_hf(tmp_path, arch, **extra):
    """A small random-initialised transformers model saved as a sharded safetensors HF directory."""
    import transformers
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    common.update(extra)
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    hf = model_cls(cfg_cls(**common)).eval()
    with torch.no_grad():  # norms away from 1 so a mis-loaded norm shows
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    return hf


ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}
ROPE_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
ROPE_LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),
    ("llama", {"rope_parameters": ROPE_LLAMA3, "attention_bias": True, "tie_word_embeddings": True}),
    ("llama", {"rope_parameters": ROPE_LINEAR}),
    ("qwen2", {"rope_parameters": ROPE_YARN}),
    ("mistral", {"head_dim": 32}),
])
def test_hf_directory_matches_transformers(tmp_path, arch, extra):
    hf = _tiny_hf(tmp_path, arch, **extra)
    assert (tmp_path / "model.safetensors.index.json").is_file()       # really sharded
    model, _ = load(tmp_path, tokenizer=False)
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = hf(ids).logits, model(ids)
    assert (ours - ref).abs().max().item() < LOGIT_TOL


def test_dtypes(tmp_path):
    _tiny_hf(tmp_path, "llama")
    for name, dt in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        model, _ = load(tmp_path, dtype=name, tokenizer=False)
        assert all(p.dtype == dt for p in model.parameters())
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_config_from_hf_rejects_unknown_arch():
    from lowbit.models.arch import config_from_hf
    from lowbit.errors import LowbitError
    with pytest.raises(LowbitError, match="unsupported architecture model_type='gpt2'"):
        config_from_hf({"model_type": "gpt2"})
