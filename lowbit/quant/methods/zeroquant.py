"""ZeroQuant (Yao et al., 2022): group-wise weights + token-wise dynamic activations, with optional LKD.

Quantized layer: FakeQuantLinear holding the group-wise quantize-dequantized weight (symmetric by default,
`bits`, `group_size`; attention projections may use `attn_bits`, the paper's W4/8 mix) and quantizing its
input per token to int8 at run time (act_bits=8; 16 leaves activations in float). It is the simulation
layer: it stores the weight in the model's dtype, not packed (codes + group scales), since lowbit has no
packed weight-only layer with activation quantization.

LKD (layer-by-layer knowledge distillation, lkd_steps > 0): after a block's Linears are quantized, the block
is trained to reproduce the float block's outputs on the calibration inputs (MSE), one block at a time:
  * trainable: a float "latent" copy of every Linear's weight (and bias), initialised from the float weight,
    and the block's norm weights (lkd_norms; the architecture record's `norms`) — everything float in the
    block, as the paper trains the whole quantized layer;
  * forward: weights group-quantized from the latent copy and inputs per-token int8 quantized, both with a
    straight-through estimator (the rounding is the identity for the gradient);
  * Adam, lr lkd_lr, lkd_steps steps over seeded random minibatches of lkd_batch calibration windows;
  * inputs (lkd_inputs): "quantized" (default) trains on the walk's inputs, i.e. the outputs of the blocks
    already quantized, with the float block's outputs on those inputs as targets (what the block will see
    at inference); "float" is the paper's formulation, where teacher and student both read the float
    model's hidden states (kept by the method, one extra float block pass per block);
  * afterwards every Linear is re-quantized from its trained latent weight (the same function as in
    training, so the model is exactly the one trained), and the block's output MSE before/after LKD is
    reported (an entry of QuantReport.blocks, and the block's Linears' report `extra`). If LKD made it worse
    the block's RTN state is restored (`reverted`).
Memory stays bounded by one block: latent weights exist only while their block is trained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.int8_matmul import ACT_QUANT
from lowbit.layers import FakeQuantLinear, swap_linear
from lowbit.kernels.primitives import QuantSpec, fake_quantize_weight
from lowbit.quant.context import BlockContext, sum_sq_err
from lowbit.quant.registry import BlockReport, Method, MethodConfig, Quantized, option, register

ACT_BITS = (8, 16)
LKD_INPUTS = ("quantized", "float")


@dataclass
class ZeroQuantConfig(MethodConfig):
    bits: int = option(4, "weight bits, 2..8 (attention projections: --attn-bits)")
    group_size: int = option(128, "weights per scale along the input: N, -1 per output channel")
    sym: bool = option(True, "symmetric weight grid")
    attn_bits: int | None = option(None, "weight bits of the attention projections (none: --bits)")
    act_bits: int = option(8, "8: per-token dynamic int8 activations; 16: no activation quantization")
    lkd_steps: int = option(0, "layer-wise distillation (LKD): optimizer steps per block (0: off)")
    lkd_lr: float = option(2e-4, "LKD: Adam learning rate")
    lkd_batch: int = option(4, "LKD: calibration windows per step")
    lkd_norms: bool = option(True, "LKD: also train the block's norm weights")
    lkd_seed: int = option(0, "LKD: seed of the minibatch order")
    lkd_inputs: Literal["quantized", "float"] = option(
        "quantized", "LKD block inputs: the walk's (outputs of the blocks quantized so far) or the float "
                     "model's (the paper's)")

    def __post_init__(self):
        self.spec(False), self.spec(True)  # validates bits / group size up front
        if self.act_bits not in ACT_BITS:
            raise LowbitError(f"--act-bits: expected one of {ACT_BITS} (8 = per-token int8, 16 = float), "
                              f"got {self.act_bits!r}")
        for name, v, lo in (("lkd-steps", self.lkd_steps, 0), ("lkd-batch", self.lkd_batch, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise LowbitError(f"--{name}: expected an integer >= {lo}, got {v!r}")
        if self.lkd_inputs not in LKD_INPUTS:
            raise LowbitError(f"--lkd-inputs: expected one of {LKD_INPUTS}, got {self.lkd_inputs!r}")
        if not self.lkd_lr > 0:
            raise LowbitError(f"--lkd-lr: expected a positive learning rate, got {self.lkd_lr!r}")

    def spec(self, attention: bool) -> QuantSpec:
        bits = self.attn_bits if attention and self.attn_bits is not None else self.bits
        return QuantSpec(bits=bits, symmetric=self.sym, group_size=self.group_size)


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """xq in the forward pass, the identity in the backward pass (straight-through estimator)."""
    return x + (xq - x).detach()


class _LatentLinear(nn.Module):
    """A Linear under LKD: trainable float weight, quantized (with STE) on every forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, act: str | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.spec, self.act = spec, act

    def forward(self, x):
        w = _ste(self.weight, fake_quantize_weight(self.weight.detach(), self.spec))
        if self.act is not None:
            quant, dequant = ACT_QUANT[self.act]
            x2 = x.reshape(-1, x.shape[-1]).detach()
            x = _ste(x, dequant(*quant(x2, None)).to(x.dtype).reshape(x.shape))
        return F.linear(x, w, self.bias)


@register("zeroquant")
class ZeroQuant(Method):
    config_cls = ZeroQuantConfig
    needs_inputs = True                        # LKD trains on the block's inputs

    def __init__(self, cfg: ZeroQuantConfig):
        super().__init__(cfg)
        self.act = "int8" if cfg.act_bits == 8 else None
        self._xf: torch.Tensor | None = None   # lkd_inputs="float": the float model's hidden states [N, S, d]

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.lkd_steps > 0

    needs_targets = needs_calibration

    def _spec(self, ctx: BlockContext, name: str) -> QuantSpec:
        return self.cfg.spec(attention=ctx.arch.is_attention(name))

    def _layer(self, weight: torch.Tensor, bias, spec: QuantSpec, dtype) -> FakeQuantLinear:
        out_f, in_f = weight.shape
        layer = FakeQuantLinear(in_f, out_f, spec, act=self.act, bias=bias is not None, dtype=dtype,
                                device=weight.device)
        layer._load("weight", fake_quantize_weight(weight.detach().float(), spec))
        if bias is not None:
            layer._load("bias", bias.detach())
        return layer

    def quantize_linear(self, ctx, name, linear, stats):
        if self.cfg.lkd_steps > 0:   # this block's float weights, kept for LKD
            ctx.scratch.setdefault("float", {})[name] = (
                linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone())
        return Quantized(self._layer(linear.weight, linear.bias, self._spec(ctx, name), linear.weight.dtype))

    # ------------------------------------------------------------------ LKD

    @staticmethod
    def _block_mse(ctx: BlockContext, xs, targets) -> float:
        """Mean squared error of the block's outputs on xs against targets [N, S, d] (the walk's runner)."""
        return sum_sq_err(ctx.run(xs), targets, ctx.batch) / targets.numel()

    def finish_block(self, ctx, inputs, targets):
        if self.cfg.lkd_steps == 0 or inputs is None:
            return None
        qblock, floats = ctx.block, ctx.scratch.pop("float", {})
        t0 = time.perf_counter()
        rtn = {n: qblock.get_submodule(n) for n in floats}
        if self.cfg.lkd_inputs == "float":
            # The paper's LKD: teacher and student both read the float model's hidden states.
            inputs = inputs if ctx.index == 0 or self._xf is None else self._xf
            for n, (w, b) in floats.items():
                swap_linear(qblock, n, _float_linear(w, b))
            targets = self._xf = ctx.run(inputs)
            for n, layer in rtn.items():
                swap_linear(qblock, n, layer)
        mse_before = self._block_mse(ctx, inputs, targets)
        norms = [p for n in ctx.arch.norms for p in qblock.get_submodule(n).parameters()]
        norms_before = [p.detach().clone() for p in norms]
        dtype = norms[0].dtype if norms else next(iter(floats.values()))[0].dtype

        # Training copy: latent float32 weights swapped in, the rest of the block in float32.
        latents = {n: _LatentLinear(w, b, self._spec(ctx, n), self.act) for n, (w, b) in floats.items()}
        for n, lat in latents.items():
            swap_linear(qblock, n, lat)
        qblock.float()
        for p in qblock.parameters():
            p.requires_grad_(False)
        params = [p for lat in latents.values() for p in lat.parameters()]
        if self.cfg.lkd_norms:
            params += norms                    # .float()/.to() keep the Parameter objects, changing their data
        for p in params:
            p.requires_grad_(True)
        losses = self._train(qblock, params, inputs, targets, ctx.rope)
        for p in qblock.parameters():
            p.requires_grad_(False)
        qblock.to(dtype)

        # Re-quantize the trained latent weights into the final layers.
        for n, lat in latents.items():
            swap_linear(qblock, n, self._layer(lat.weight, lat.bias, lat.spec, floats[n][0].dtype))
        mse_after = self._block_mse(ctx, inputs, targets)
        reverted = mse_after > mse_before
        if reverted:  # LKD did not help this block: back to round-to-nearest
            for n, layer in rtn.items():
                swap_linear(qblock, n, layer)
            with torch.no_grad():
                for p, p0 in zip(norms, norms_before):
                    p.copy_(p0)
        entry = {"mse_before": mse_before, "mse_after": mse_before if reverted else mse_after,
                 "mse_trained": mse_after, "reverted": reverted, "first_loss": losses[0], "last_loss": losses[-1],
                 "steps": self.cfg.lkd_steps, "seconds": time.perf_counter() - t0}
        row = {f"lkd_{k}": entry[k] for k in ("mse_before", "mse_after", "reverted")}
        return BlockReport(entry, {n: dict(row) for n in floats})

    def _train(self, block, params, xs, targets, kw) -> list[float]:
        dev = kw["cos"].device
        cos, sin = kw["cos"].float(), kw["sin"].float()
        # fused: one kernel for all of the block's tensors (CPU and CUDA); same update, ~4x faster on CPU here
        opt = torch.optim.Adam(params, lr=self.cfg.lkd_lr, fused=dev.type in ("cpu", "cuda"))
        g = torch.Generator().manual_seed(self.cfg.lkd_seed)
        n, b = xs.shape[0], min(self.cfg.lkd_batch, xs.shape[0])
        order, pos, losses = torch.randperm(n, generator=g), 0, []
        with torch.enable_grad():
            for _ in range(self.cfg.lkd_steps):
                if pos + b > n:                                           # next epoch: a new shuffle
                    order, pos = torch.randperm(n, generator=g), 0
                idx = order[pos: pos + b]
                pos += b
                x, y = xs[idx].to(dev).float(), targets[idx].to(dev).float()    # [b, S, d]
                loss = F.mse_loss(block(x, _rope(cos, b), _rope(sin, b)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses


def _float_linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    lin.bias = None if b is None else nn.Parameter(b, requires_grad=False)
    return lin


def _rope(t: torch.Tensor, b: int) -> torch.Tensor:
    """The walk's RoPE table (same positions in every row) for a batch of b windows."""
    return t[:1].expand(b, *t.shape[1:])
