"""AWQ: activation-aware weight quantization (Lin et al., 2023), weight-only k-bit with per-group scales.

Per decoder block (lowbit.quant.walk calls prepare_block, then quantize_linear for each Linear):

1. Scale search (prepare_block), per input group (producer -> consumers) of the block layout, on the float block:
   x_mean = mean |X| per input channel of the consumers' input X; for α in {0, 1/n, ..., (n-1)/n} (n_grid = 20):
       s = x_mean^α (clamped >= 1e-4), normalised s / sqrt(max(s) · min(s))            (as llm-awq)
       consumers' weights  W -> Q(W · s) / s   (RTN with the target grid; same product as Q(W s) applied to X / s)
       loss(α) = mean (f(X) - f_q(X))²
   where f is what the reference inspects: the whole attention module for the q/k/v group, the whole MLP for the
   gate/up group, and the consumer itself for single-consumer groups (search_scope="module"); or, with
   search_scope="linears", the group's consumers' outputs only (the paper's per-layer objective). Every forward
   goes through the walk's block runner (BlockContext.run), in its batches of calibration windows. α = 0 gives s ≡ 1,
   i.e. plain RTN, so the chosen scale never does worse than RTN on the search data. All groups are searched on the
   unscaled block, then every best scale is folded in (lowbit.quant.fold): norm weight / s, or producer rows / s.
   The (v_proj -> o_proj) group is skipped when v_proj's outputs are not o_proj's inputs one to one (GQA, e.g.
   SmolLM2: 192 vs 576), as the reference does.
2. Clipping search (quantize_linear), per Linear the architecture record clips (`Arch.clips`: all but q_proj /
   k_proj, which the reference skips: their error acts through the q·k softmax, which a matmul-error criterion
   does not see): for ratios r in
   {1, 1 - 1/n_grid, ..., > 1 - max_shrink} (1.0 .. 0.55 by default) and each (output row, input group), the range
   is clipped to [-r·absmax, r·absmax] ∩ [min, max] and the r minimising ||(W - Q(W; r)) X||² over the group's
   columns is kept. That error is computed exactly from the per-group Gram matrix H_g = X_gᵀ X_g gathered over ALL
   calibration tokens (a block-diagonal [G, g, g] accumulator): err[o, g] = d_g H_g d_gᵀ with d = row o of
   W - Q(W). The reference instead samples 512 tokens and multiplies out; the criterion is the same.
3. WeightOnlyLinear.from_linear(linear, spec, lo, hi) with the clipped per-group ranges.

Differences from llm-awq worth knowing: the walk feeds each block the outputs of the already QUANTIZED previous
blocks (GPTQ-style) where the reference feeds the float, scaled and clipped ones; the scale search uses the first
search_tokens // seqlen calibration windows (at least one; the reference searches all 128 x 512 tokens, which
the default of 65536 matches); quantization grids are lowbit.kernels.primitives' (an integer zero point widens the
range to contain 0, the reference's does not); scales are stored in fp16 by WeightOnlyLinear.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant import fold
from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec, fake_quantize_weight
from lowbit.quant.context import BlockContext, sum_sq_err
from lowbit.quant.methods.rtn import WeightGridConfig
from lowbit.quant.observers import observe_weight
from lowbit.quant.registry import BlockReport, Method, Quantized, option, register


@dataclass
class AWQConfig(WeightGridConfig):
    n_grid: int = option(20, "grid points of the scale exponent α, and 1/n_grid steps of the clip ratios")
    clip: bool = option(True, "the weight-clipping search")
    max_shrink: float = option(0.5, "clip ratios go from 1 down to more than 1 - max_shrink")
    search_tokens: int = option(65536, "calibration tokens the scale search uses (whole windows, at least one)")
    search_scope: Literal["module", "linears"] = option(
        "module", "scale-search loss on the attention / MLP output (as llm-awq), or on the consumers' outputs")

    def __post_init__(self):
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise LowbitError(f"--n-grid: expected a positive integer, got {self.n_grid!r}")
        if not 0.0 <= float(self.max_shrink) < 1.0:
            raise LowbitError(f"--max-shrink: expected a value in [0, 1), got {self.max_shrink!r}")
        if isinstance(self.search_tokens, bool) or not isinstance(self.search_tokens, int) or self.search_tokens < 1:
            raise LowbitError(f"--search-tokens: expected a positive integer, got {self.search_tokens!r}")
        if self.search_scope not in ("module", "linears"):
            raise LowbitError(f"--search-scope: expected module or linears, got {self.search_scope!r}")


# ----------------------------------------------------------------------------- step 1: the scale search

@dataclass
class ScaleSearch:
    alpha: float                     # the chosen exponent
    scales: torch.Tensor             # [in] float32, the s to fold
    losses: list[float] = field(default_factory=list)   # loss per grid point; losses[0] (α = 0) is plain RTN

    @property
    def rtn_loss(self) -> float:
        return self.losses[0]

    @property
    def best_loss(self) -> float:
        return min(self.losses)


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x_mean^α clamped to >= 1e-4, divided by sqrt(max(s) · min(s)) (llm-awq's normalisation). [in]"""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(x: torch.Tensor, linears: Sequence[nn.Linear], spec: QuantSpec,
                 forward: Callable | None = None, n_grid: int = 20,
                 ctx: BlockContext | None = None) -> ScaleSearch:
    """AWQ's grid search of s = x_mean^α for consumers `linears` sharing the input x [B, S, in].

    forward(x, cos, sin) -> output is the function whose output error is minimised (default: the consumers'
    outputs concatenated), run over x by the block runner (`ctx.run`: the walk's batches of whole windows,
    so attention can be inspected, and its RoPE tables; without ctx, batches of BATCH windows and no RoPE)
    while the consumers' weights are temporarily replaced by Q(W·s)/s. The weights are restored afterwards.
    """
    if forward is None:
        def forward(xb, _cos, _sin):
            return torch.cat([lin(xb) for lin in linears], -1)
    if ctx is None:
        ctx = BlockContext(index=0, block=None, arch=None, device=x.device)
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)                 # [in]
    ref = ctx.run(x, fn=forward).float()                                      # [B, S, out]
    originals = [lin.weight.detach().clone() for lin in linears]
    rows = [w.shape[0] for w in originals]
    w_all = torch.cat([w.float() for w in originals])                         # [sum out, in]: groups are per row
    best = None
    losses = []
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = awq_scales(x_mean, alpha).to(w_all.device)                     # [in]
            ws = w_all * s                                                     # [sum out, in]
            if spec.group_size == 0:   # one range per tensor: quantize each consumer on its own
                wq = torch.cat([fake_quantize_weight(p, spec) for p in ws.split(rows)]) / s
            else:                      # ranges are per row (group), so the stacked rows quantize as one
                wq = fake_quantize_weight(ws, spec) / s                        # Q(W s) / s
            for lin, w, part in zip(linears, originals, wq.split(rows)):
                lin.weight.data = part.to(w.dtype)
            loss = sum_sq_err(ctx.run(x, fn=forward), ref, ctx.batch) / ref.numel()
            losses.append(loss)
            if not math.isfinite(loss):
                continue
            if best is None or loss < best[0]:
                best = (loss, alpha, s.float().cpu())
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    if best is None:
        raise LowbitError(f"awq: the scale search produced no finite loss ({losses})")
    return ScaleSearch(alpha=best[1], scales=best[2], losses=losses)


# ----------------------------------------------------------------------------- step 2: the clipping search

class GroupGram:
    """Collector: H [G, g, g] = Σ X_gᵀ X_g per input group g of a Linear's inputs (block-diagonal Gram matrix).

    Columns past in_features (the short last group) are zero-padded, so they add nothing.
    """

    def __init__(self, in_features: int, spec: QuantSpec):
        self.g = spec.group_size if spec.group_size > 0 else in_features
        self.G = -(-in_features // self.g)
        self.in_features = in_features
        self.H: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()                        # [M, in]
        pad = self.G * self.g - self.in_features
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))                           # [M, G*g]
        xg = x.reshape(x.shape[0], self.G, self.g).transpose(0, 1)             # [G, M, g]
        h = xg.transpose(1, 2) @ xg                                            # [G, g, g]
        self.H = h if self.H is None else self.H + h
        self.rows += x.shape[0]


def _group_err(d: torch.Tensor, gram: GroupGram) -> torch.Tensor:
    """err [out, G] = d_g H_g d_gᵀ for d [out, in] (row o, group g): ||d_g X_gᵀ||² summed over tokens."""
    pad = gram.G * gram.g - d.shape[1]
    if pad:
        d = torch.nn.functional.pad(d, (0, pad))
    dg = d.reshape(d.shape[0], gram.G, gram.g).transpose(0, 1)                 # [G, out, g]
    return ((dg @ gram.H.to(dg.device)) * dg).sum(-1).transpose(0, 1)          # [out, G]


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: GroupGram, spec: QuantSpec, n_grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best clipped range per (row, group) of w [out, in] -> (lo, hi [rows, G, 1], ratio [rows, G]).

    Ratios r = 1 - i / n_grid for i < max_shrink · n_grid; the range is [-r·absmax, r·absmax] intersected with
    the group's [min, max] (llm-awq clamps the weight to ±r·absmax, then quantizes min..max of what is left).
    Ties keep the larger r (r = 1 is plain min/max).
    """
    w = w.detach().float()
    lo0, hi0 = observe_weight(w, spec)                                         # [rows, G, 1] min, max
    amax = torch.maximum(lo0.abs(), hi0.abs())
    best_err = best_lo = best_hi = best_r = None
    for i in range(max(1, int(max_shrink * n_grid))):
        r = 1 - i / n_grid
        lo, hi = torch.maximum(lo0, -r * amax), torch.minimum(hi0, r * amax)
        err = _group_err(fake_quantize_weight(w, spec, lo, hi) - w, gram)      # [out, G]
        if spec.group_size == 0:
            err = err.sum().reshape(1, 1)                                      # one range for the tensor
        err = err.unsqueeze(-1)                                                # [rows, G, 1]
        if best_err is None:
            best_err, best_lo, best_hi, best_r = err, lo, hi, torch.ones_like(err)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_lo, best_hi, best_r.squeeze(-1)


# ----------------------------------------------------------------------------- the method

def _inspect_module(block: nn.Module, consumers: Sequence[str]) -> nn.Module | None:
    """The common parent of several consumers ("self_attn" for q/k/v, "mlp" for gate/up), else None."""
    if len(consumers) < 2:
        return None
    parts = [c.split(".")[:-1] for c in consumers]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return block.get_submodule(".".join(common)) if common else None


def _module_forward(mod: nn.Module) -> Callable:
    """`mod` as the runner calls a stage, fn(x, cos, sin): an attention module gets the batch's RoPE cos/sin."""
    params = inspect.signature(mod.forward).parameters
    if "cos" in params and "sin" in params:
        def fwd(xb, cos, sin):
            if cos is None:
                raise LowbitError("awq: inspecting attention needs the block's RoPE tensors")
            return mod(xb, cos, sin, None, None)
        return fwd
    return lambda xb, _cos, _sin: mod(xb)


@register("awq")
class AWQ(Method):
    config_cls = AWQConfig
    needs_calibration = True

    def __init__(self, cfg: AWQConfig):
        super().__init__(cfg)
        self.spec = cfg.spec()

    # -- step 1
    @torch.no_grad()
    def search_block(self, ctx: BlockContext, xs: torch.Tensor) -> dict:
        """Search the scale of every foldable input group of the float block on (a subset of) its inputs
        xs [N, S, d]. Returns {"groups": [(producer, consumers, ScaleSearch)], "skipped": [...]}; changes nothing."""
        block = ctx.block
        groups, skipped = fold.foldable_groups(block, ctx.layout)
        k = max(1, min(xs.shape[0], self.cfg.search_tokens // max(1, xs.shape[1])))
        feats: dict[str, list[torch.Tensor]] = {cs[0]: [] for _, cs in groups}
        handles = []
        for name in feats:
            def hook(_m, args, _name=name):
                feats[_name].append(args[0].detach())
            handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
        try:
            ctx.run(xs[:k])
        finally:
            for h in handles:
                h.remove()
        found = []
        for producer, consumers in groups:
            x = torch.cat(feats[consumers[0]])                                 # [k, S, in] on the device
            linears = [block.get_submodule(c) for c in consumers]
            mod = _inspect_module(block, consumers) if self.cfg.search_scope == "module" else None
            if mod is None and self.cfg.search_scope == "module" and len(consumers) == 1:
                mod = linears[0]
            fwd = _module_forward(mod) if mod is not None else None
            found.append((producer, consumers, search_scale(x, linears, self.spec, fwd, self.cfg.n_grid, ctx)))
        return {"groups": found, "skipped": skipped}

    def prepare_block(self, ctx, xs):
        res = self.search_block(ctx, xs)
        alpha_of = ctx.scratch["alpha"] = {}     # consumer name -> α of its group, for the layers' report rows
        entry = {"groups": {}, "skipped": [p for p, _ in res["skipped"]]}
        for producer, consumers, found in res["groups"]:
            fold.fold_scale(ctx.block, producer, consumers, found.scales)
            for c in consumers:
                alpha_of[c] = found.alpha
            entry["groups"][producer] = {"alpha": found.alpha, "loss": found.best_loss, "rtn_loss": found.rtn_loss}
        return BlockReport(entry)

    # -- step 2 and 3
    def collector(self, ctx, name, linear):
        if not self.cfg.clip or not ctx.arch.clips(name):
            return None
        return GroupGram(linear.in_features, self.spec)

    def quantize_linear(self, ctx, name, linear, stats):
        lo = hi = None
        extra = {"alpha": ctx.scratch.get("alpha", {}).get(name)}
        if stats is not None and stats.H is not None:
            lo, hi, ratio = search_clip(linear.weight, stats, self.spec, self.cfg.n_grid, self.cfg.max_shrink)
            extra["clip_ratio_mean"] = float(ratio.mean())
        return Quantized(WeightOnlyLinear.from_linear(linear, self.spec, lo=lo, hi=hi), extra)
