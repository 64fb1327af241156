"""top-k / top-p filtering against a direct per-row implementation."""
import torch

from lowbit.config import SamplingParams
from lowbit.sampling import filter_logits, sample


def _reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    order = sorted(range(row.numel()), key=lambda i: -row[i].item())
    if k:
        order = order[:k]
    probs = torch.softmax(row[order].double(), 0)
    keep, mass = [], 0.0
    for i, pr in zip(order, probs.tolist()):
        if mass >= p:
            break
        keep.append(i)
        mass += pr
    return set(keep)


def test_filter_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for k, p in [(0, 0.9), (5, 1.0), (10, 0.5), (0, 0.3)]:
        out = filter_logits(logits, SamplingParams(top_k=k, top_p=p))
        for r in range(6):
            kept = set(torch.isfinite(out[r]).nonzero().flatten().tolist())
            ref_logits = torch.where(torch.isfinite(filter_logits(logits[r:r + 1], SamplingParams(top_k=k)))[0],
                                     logits[r], torch.tensor(float("-inf")))
            assert kept == _reference_keep(ref_logits if k else logits[r], k, p)


def test_sampling_distribution_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert sample(logits, SamplingParams(temperature=0)).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingParams(), g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    top1 = torch.stack([sample(logits, SamplingParams(top_k=1), g) for _ in range(50)])
    assert (top1 == 0).all()
