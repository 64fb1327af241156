"""GPTQ core (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") as pure tensor functions: no modules, hooks or model walking.

Notation follows the paper: W [out, n] (n = in_features), X the layer inputs, and
H = 2 X Xᵀ / N [n, n] the Hessian of the layer-wise objective ||W X - Ŵ X||² (Eq. 1).
OBQ (Eq. 2) quantizes one column q at a time and spreads its error over the columns not yet
quantized, δ = -(w_q - quant(w_q)) / [H⁻¹]_qq · H⁻¹_{:,q}, then drops q from H⁻¹ by Gaussian
elimination (Eq. 3). GPTQ fixes the column order, reads all the H⁻¹ rows it needs from one
upper Cholesky factor of H⁻¹ (row q of that factor is row q of the eliminated H⁻¹ divided by
sqrt([H⁻¹]_qq)), and applies the updates lazily per block of columns (Algorithm 1).

All rounding goes through lowbit.kernels.primitives (qparams / quantize / dequantize), so
the grids are the project's: in particular the symmetric grid is signed ([-2^(b-1), 2^(b-1)-1],
zero = 0) rather than the reference's unsigned grid with zero = 2^(b-1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

from lowbit.errors import LowbitError
from lowbit.quant.observers import MSEObserver
from lowbit.kernels.primitives import QuantSpec, dequantize, qparams, quantize, round_qparams

MAX_DAMP_RETRIES = 4  # percdamp x10 each time: 0.01 -> 0.1 -> 1 -> 10 -> 100
RETRY_PERCDAMP_FROM_ZERO = 0.01  # x10 of 0 is 0, so a failed percdamp=0 restarts at the reference default


class HessianAccumulator:
    """Running H = 2/N · Σ x xᵀ over every row x seen (all leading dims of update()'s input are rows).

    Same running-average update as the reference (H *= n/(n+m); x *= sqrt(2/(n+m)); H += xᵀx) so
    H stays O(1) however many rows arrive. One difference: the reference counts a [B, T, in]
    batch as B samples, we count B·T rows, so our H is the true 2/N XᵀX (GPTQ's output does not
    depend on H's scale; only `loss` does).
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise LowbitError(f"HessianAccumulator dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.H: torch.Tensor | None = None  # [in, in] once the first batch arrives
        self.nsamples = 0

    def update(self, x: torch.Tensor) -> "HessianAccumulator":
        if x.ndim == 0:
            raise LowbitError("HessianAccumulator.update: x must have shape [..., in], got a 0-d tensor")
        x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)  # [..., in] -> [m, in], one row per token
        m, d = x.shape
        if self.H is None:
            self.H = torch.zeros(d, d, dtype=self.dtype, device=x.device)  # [in, in]
        elif d != self.H.shape[0]:
            raise LowbitError(f"HessianAccumulator.update: x has {d} input features, "
                              f"earlier batches had {self.H.shape[0]}")
        if m == 0:
            return self
        self.H.mul_(self.nsamples / (self.nsamples + m))  # old average re-weighted to n/(n+m)
        self.nsamples += m
        x = x * math.sqrt(2.0 / self.nsamples)  # so that xᵀx adds 2/(n+m) · Σ_new x xᵀ
        self.H.addmm_(x.t(), x)  # [in, m] @ [m, in]
        return self


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [out, in] spec.code_dtype, ORIGINAL column order
    scale: torch.Tensor  # [out, G] (G = ceil(in / group_size), or 1 per-channel / per-tensor)
    zero: torch.Tensor   # [out, G] (zeros for symmetric specs)
    g_idx: torch.Tensor  # int32 [in]: group of each original column (not monotone with act_order,
                         # unless static_groups: then arange(in) // group_size)
    W_hat: torch.Tensor  # [out, in] = dequantize(codes, scale[:, g_idx], zero[:, g_idx]) in W's dtype
    loss: float          # Σ (w - q)² / [H⁻¹]_qq / 2, the OBS error as the reference sums it
    damp: float          # λ actually added to diag(H)
    percdamp: float      # the relative dampening that λ came from (after any retries)
    perm: torch.Tensor | None  # int64 [in] act_order processing order (perm[i] = i-th column quantized)


def _row_params(block: torch.Tensor, spec: QuantSpec, mse_clip: bool, per_tensor: bool = False,
                scale_dtype: torch.dtype | None = None):
    """(scale, zero) [out, 1] with one range per row of block [out, k] (or one for all of it).

    With scale_dtype, scale and zero are rounded to the dtype they will be stored in before any code is
    chosen, so the error feedback sees exactly the weights the saved layer will compute with.
    """
    gran = 0 if per_tensor else -1
    if mse_clip:  # the project's MSE observer (shrink grid search) instead of the reference's own
        lo, hi = MSEObserver(replace(spec, group_size=gran))(block)  # [out, 1, 1] or [1, 1, 1]
        lo, hi = lo.reshape(-1, 1), hi.reshape(-1, 1)  # [out, 1] or [1, 1]
    elif per_tensor:
        lo, hi = block.amin().reshape(1, 1), block.amax().reshape(1, 1)  # [1, 1]
    else:
        lo, hi = block.amin(1, keepdim=True), block.amax(1, keepdim=True)  # [out, 1]
    scale, zero = qparams(lo, hi, spec)
    if scale_dtype is not None:
        scale, zero = round_qparams(scale, zero, scale_dtype)
    n_rows = block.shape[0]
    return scale.expand(n_rows, 1).clone(), zero.expand(n_rows, 1).clone()  # [out, 1]


def _damped_inverse_cholesky(H: torch.Tensor, percdamp: float):
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = Uᵀ U), λ = percdamp · mean(diag H).

    As the reference: cholesky(H) -> cholesky_inverse -> cholesky(upper=True). On failure the
    dampening grows x10 (a warning names the new value) up to MAX_DAMP_RETRIES times.
    """
    mean_diag = H.diagonal().mean()
    p = percdamp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        lam = p * mean_diag
        Hd = H.clone()
        Hd.diagonal().add_(lam)  # [n, n], H + λI
        L, info = torch.linalg.cholesky_ex(Hd)  # lower, Hd = L Lᵀ
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, float(lam), p
        if attempt == MAX_DAMP_RETRIES:
            break
        p = p * 10 if p > 0 else RETRY_PERCDAMP_FROM_ZERO
        warnings.warn(f"gptq: H + damping is not positive definite; retrying with percdamp={p:g}", stacklevel=3)
    raise LowbitError(f"gptq: Cholesky of the dampened Hessian failed even with percdamp={p:g}; "
                      "the calibration Hessian is degenerate (too few or non-finite calibration inputs?)")


def _check(W, H, spec, blocksize, percdamp):
    if not isinstance(spec, QuantSpec):
        raise LowbitError(f"gptq: spec must be a QuantSpec, got {type(spec).__name__}")
    if W.ndim != 2 or not W.is_floating_point():
        raise LowbitError(f"gptq: W must be a floating [out, in] matrix, got {W.dtype} of shape {tuple(W.shape)}")
    n = W.shape[1]
    if tuple(H.shape) != (n, n) or not H.is_floating_point():
        raise LowbitError(f"gptq: H must be a floating [{n}, {n}] matrix for W of shape {tuple(W.shape)}, "
                          f"got {H.dtype} of shape {tuple(H.shape)}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise LowbitError(f"gptq: blocksize must be a positive integer, got {blocksize!r}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise LowbitError(f"gptq: percdamp must be a finite number >= 0, got {percdamp!r}")
    if not bool(torch.isfinite(W).all()) or not bool(torch.isfinite(H).all()):
        raise LowbitError("gptq: W and H must be finite (found nan/inf)")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, mse_clip: bool = False,
                  scale_dtype: torch.dtype | None = None, static_groups: bool = False) -> GPTQResult:
    """Quantize W [out, in] column by column with GPTQ against the input Hessian H [in, in].

    Works in float64 if W or H is float64, else float32 (as the reference). Groups
    (spec.group_size > 0) are consecutive runs of group_size columns in PROCESSING order (the
    permuted order with act_order, the reference's default non-"static" groups); the last group
    may be shorter when group_size does not divide in. Each group's range is taken when its first
    column comes up, from the group's weights as the error feedback has left them.
    group_size -1 (per-channel) / 0 (per-tensor) take their ranges from W once, before any column
    is quantized, as the reference does.

    static_groups (the reference's `static_groups`; compressed-tensors' actorder="weight" when
    combined with act_order): groups are the contiguous runs j·g .. (j+1)·g - 1 of the ORIGINAL
    column order, and every group's range is taken upfront from the original (dead-zeroed) W,
    before any error feedback. Columns are still processed in act_order's order, each quantized
    against its own original-order group's range, so g_idx is arange(in) // group_size (monotone:
    a checkpoint needs no g_idx). Without act_order only the moment the ranges are taken changes
    (upfront instead of at group start). No effect for per-channel / per-tensor specs.
    """
    _check(W, H, spec, blocksize, percdamp)
    dt = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    n_out, n = W.shape
    W_in_dtype = W.dtype
    W = W.detach().to(dt, copy=True)  # [out, n], our copy; error feedback updates it in place
    H = H.detach().to(device=W.device, dtype=dt, copy=True)  # [n, n]

    # Dead inputs (reference): an input that was always 0 has H_jj = 0; its weights never matter,
    # so zero them and put 1 on the diagonal to keep H invertible.
    dead = H.diagonal() == 0  # [n] bool
    H.diagonal()[dead] = 1
    W[:, dead] = 0

    gs = spec.group_size
    static = static_groups and gs > 0
    if gs > 0:
        n_groups = -(-n // gs)  # ceil: a non-dividing group_size leaves a shorter last group
        scale = W.new_zeros(n_out, n_groups)  # [out, G], filled as each group starts (or now if static)
        zero = W.new_zeros(n_out, n_groups)
        if static:  # reference static_groups: every range from the original-order, un-updated W
            for g in range(n_groups):
                s, z = _row_params(W[:, g * gs:(g + 1) * gs], spec, mse_clip, scale_dtype=scale_dtype)  # [out, 1]
                scale[:, g:g + 1], zero[:, g:g + 1] = s, z
    else:  # one range per row (-1) or for the whole matrix (0), from the (dead-zeroed) W upfront.
        # Deviation: the reference takes it before zeroing dead columns; their weights never
        # reach the output, so we keep them from widening the grid.
        scale, zero = _row_params(W, spec, mse_clip, per_tensor=(gs == 0), scale_dtype=scale_dtype)  # [out, 1]

    perm = None
    if act_order:  # reference "desc_act": largest diag(H) first (stable sort: deterministic ties)
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # [n]
        W = W[:, perm]  # [out, n] columns in processing order
        H = H[perm][:, perm]  # [n, n] rows and columns permuted alike

    # Group of the column at each processing index i: i // group_size, or with static groups the
    # group of the original column processed there, perm[i] // group_size (0 for per-channel / per-tensor).
    if gs > 0:
        gp = (perm if static and perm is not None else torch.arange(n, device=W.device)) // gs  # [n]
    else:
        gp = torch.zeros(n, dtype=torch.long, device=W.device)  # [n]

    # Algorithm 1, line 3: H⁻¹ <- Cholesky(H⁻¹)ᵀ, after dampening H += λI.
    Hinv, lam, p_used = _damped_inverse_cholesky(H, float(percdamp))
    del H

    codes = torch.empty(n_out, n, dtype=spec.code_dtype, device=W.device)  # [out, n], processing order
    err2 = W.new_zeros(n_out)  # [out] Σ_j ((w - q)/d)² per row
    for i1 in range(0, n, blocksize):  # Algorithm 1, line 4: blocks of B columns
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()  # [out, c] the block; gets the in-block (eager) updates
        E = torch.zeros_like(W1)  # [out, c] scaled errors of the block (Algorithm 1's E)
        Hinv1 = Hinv[i1:i2, i1:i2]  # [c, c]
        for i in range(i2 - i1):  # Algorithm 1, line 5
            j = i1 + i  # column index in processing order
            g = int(gp[j])
            if gs > 0 and not static and j % gs == 0:
                # A new group starts: its range comes from the group's CURRENT weights, i.e. with
                # the error feedback of every column quantized so far. In-block columns have it in
                # W1; columns past the block still miss this block's lazy update, so add it here.
                # (The reference reads W[:, j:j+gs], which misses the in-block updates when a
                # group starts mid-block; identical whenever blocksize divides group_size, e.g.
                # the default 128/128. We match OBQ's column-by-column semantics exactly.)
                je = min(j + gs, n)
                cur = W1[:, i:je - i1]  # [out, min(je, i2) - j]
                if je > i2:
                    rest = W[:, i2:je] - E[:, :i] @ Hinv[i1:j, i2:je]  # [out, i] @ [i, je-i2]
                    cur = torch.cat([cur, rest], dim=1)  # [out, je - j]
                s, z = _row_params(cur, spec, mse_clip, scale_dtype=scale_dtype)  # [out, 1]
                scale[:, g:g + 1], zero[:, g:g + 1] = s, z
            w = W1[:, i:i + 1]  # [out, 1]
            c = quantize(w, scale[:, g:g + 1], zero[:, g:g + 1], spec)  # line 6: Q_{:,j} <- quant(W_{:,j})
            q = dequantize(c, scale[:, g:g + 1], zero[:, g:g + 1], spec)  # [out, 1]
            codes[:, j] = c[:, 0]
            e = (w - q) / Hinv1[i, i]  # line 7: E_{:,j-i} <- (W_{:,j} - Q_{:,j}) / [H⁻¹]_jj
            err2 += e[:, 0].square()  # (w - q)² / d² with d² = [H⁻¹_eliminated]_jj (OBS error x2)
            W1[:, i + 1:] -= e * Hinv1[i:i + 1, i + 1:]  # line 8: [out, 1] * [1, c-i-1] rank-1 update
            E[:, i] = e[:, 0]
        W[:, i2:] -= E @ Hinv[i1:i2, i2:]  # line 10: lazy update, [out, c] @ [c, n-i2]

    g_idx = gp
    if perm is not None:  # un-permute: original column perm[i] was processed i-th
        inv = torch.argsort(perm)  # [n], inv[perm[i]] = i
        codes = codes[:, inv]  # [out, n] original order
        g_idx = gp[inv]  # g_idx[perm[i]] = i // group_size (reference default with act_order),
        # or perm[i] // group_size with static groups, i.e. g_idx = arange(n) // group_size
    g_idx = g_idx.to(torch.int32)
    W_hat = dequantize(codes, scale[:, g_idx], zero[:, g_idx], spec, dtype=W_in_dtype)  # [out, n]
    return GPTQResult(codes=codes, scale=scale, zero=zero, g_idx=g_idx, W_hat=W_hat,
                      loss=float(err2.sum()) / 2, damp=lam, percdamp=p_used, perm=perm)
