"""RoPE frequencies of every rope_scaling variant against transformers' own initialisers."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lowbit.models.rope import rope_inv_freq

VARIANTS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
]


@pytest.mark.parametrize("scaling", VARIANTS, ids=lambda s: s["rope_type"] + str(s.get("factor", "")))
@pytest.mark.parametrize("theta,head_dim", [(10000.0, 64), (500000.0, 128)])
def test_inv_freq_matches_transformers(scaling, theta, head_dim):
    cfg = LlamaConfig(hidden_size=head_dim * 8, num_attention_heads=8, max_position_embeddings=131072,
                      rope_parameters={**scaling, "rope_theta": theta})
    kind = scaling["rope_type"]
    if kind == "default":
        ref = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        ref_scale = 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    ours, scale = rope_inv_freq(head_dim, theta, scaling, 131072)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)
