"""
Group gap loss and pairwise rewards of GDSO (Eqs. 10 and 11), G x G cross pairs in registers.

One training item is a pair (winner w, loser l) with labels s_w > s_l and G sampled expected
scores per side, mu_w[p, i] and mu_l[p, k]. With R = S_max - S_min and delta_w = s_w - s_l:

    r_pw_w[p, i] = 1 - 1/(G R) sum_k |(mu_w[p, i] - mu_l[p, k]) - delta_w|         (Eq. 10, j = w)
    r_pw_l[p, k] = 1 - 1/(G R) sum_i |(mu_l[p, k] - mu_w[p, i]) - delta_l|         (Eq. 10, j = l)
    L_pw[p]      = 1/(2 G^2 R) sum_{j in {w, l}} sum_{i, k} |(mu[j, i] - mu[jbar, k]) - delta_j|  (Eq. 11)

The two directions of Eq. 11 are the same sum: with delta_l = -delta_w,
    |(mu_l,i - mu_w,k) - delta_l| = |-(mu_w,k - mu_l,i - delta_w)| = |mu_w,k - mu_l,i - delta_w|,
so after renaming i <-> k the j = l half equals the j = w half and
    L_pw[p] = 1/(G^2 R) sum_{i, k} A[p, i, k],   A[p, i, k] = |mu_w[p, i] - mu_l[p, k] - delta_w[p]|.
Eq. 10 uses the same A: r_pw_w = 1 - (row sums of A) / (G R), r_pw_l = 1 - (column sums) / (G R),
and L_pw[p] = mean_i (1 - r_pw_w[p, i]). One pass over A gives all three; A (P x G x G) lives
only in registers, a BLOCK_P x BLOCK_G x BLOCK_C tile at a time.

Public function (Triton on CUDA tensors, or on CPU when TRITON_INTERPRET=1; the reference
otherwise):
    gap_l1(mu_w, mu_l, s_w, s_l, value_range) -> (loss, r_pw_w, r_pw_l)
loss is the mean of L_pw over pairs (a scalar with a gradient to mu_w and mu_l: the L1
subgradient, sign(0) = 0 at a tie); the rewards come back detached. mu may be any float dtype
and strided (e.g. views into one (P, 2, G) tensor); math in fp32, fp64 for fp64 inputs.
"""

import os

import torch
import triton
import triton.language as tl


def _use_triton(t):
    # the Triton path runs on CUDA tensors, and on CPU tensors under the interpreter (tests)
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# PyTorch reference: builds A (P, G, G) explicitly


def gap_l1_ref(mu_w, mu_l, s_w, s_l, value_range):
    """Reference for gap_l1: (loss, r_pw_w, r_pw_l), with the simplified form of Eq. 11."""
    acc = _acc_dtype(mu_w)
    mw, ml = mu_w.to(acc), mu_l.to(acc)  # (P, G)
    g = mw.shape[1]
    delta = (s_w.to(acc) - s_l.to(acc)).detach()  # (P,) delta_w; labels carry no gradient
    a = (mw[:, :, None] - ml[:, None, :] - delta[:, None, None]).abs()  # (P, G, G), A[p, i, k]
    loss = a.sum(dim=(1, 2)).mean() / (g * g * value_range)  # Eq. 11, mean over pairs
    r_w = 1 - a.sum(dim=2) / (g * value_range)  # Eq. 10 for the winner samples
    r_l = 1 - a.sum(dim=1) / (g * value_range)  # Eq. 10 for the loser samples
    return loss, r_w.detach(), r_l.detach()


# -----------------------------------------------------------------------------
# Triton kernels: one program holds BLOCK_P pairs, all G winner samples (BLOCK_G >= G) and walks
# the loser samples in chunks of BLOCK_C


@triton.jit
def _rne_bf16(x):
    # fp32 -> bf16 rounding for the interpreter: a GPU's cast rounds to nearest even, the
    # interpreter's truncates. adding 0x7fff plus the lowest kept bit and clearing the low 16
    # bits rounds to nearest even, after which the truncating cast is exact.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _gap_fwd_kernel(
    mw_ptr, ml_ptr, sw_ptr, sl_ptr,  # inputs: mu_w (P, G), mu_l (P, G), s_w (P,), s_l (P,)
    lp_ptr, rw_ptr, rl_ptr,  # outputs: L_pw (P,), r_pw_w (P, G), r_pw_l (P, G)
    stride_wp, stride_wg, stride_lp, stride_lg, stride_sw, stride_sl,
    P, G, inv_gr,  # inv_gr = 1 / (G R)
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # int64 offsets
    gi = tl.arange(0, BLOCK_G)
    pmask = pairs < P
    imask = gi < G
    wmask = pmask[:, None] & imask[None, :]
    mw = tl.load(mw_ptr + pairs[:, None] * stride_wp + gi[None, :] * stride_wg, mask=wmask, other=0.0)
    sw = tl.load(sw_ptr + pairs * stride_sw, mask=pmask, other=0.0).to(acc_ty)
    sl = tl.load(sl_ptr + pairs * stride_sl, mask=pmask, other=0.0).to(acc_ty)
    # shift the winner side by delta_w once: A[p, i, k] = |x[p, i] - mu_l[p, k]|
    x = mw.to(acc_ty) - (sw - sl)[:, None]
    row = tl.zeros([BLOCK_P, BLOCK_G], dtype=acc_ty)  # sum_k A[p, i, k]
    for k0 in range(0, G, BLOCK_C):
        gk = k0 + tl.arange(0, BLOCK_C)
        kmask = gk < G
        lmask = pmask[:, None] & kmask[None, :]
        ml = tl.load(ml_ptr + pairs[:, None] * stride_lp + gk[None, :] * stride_lg, mask=lmask, other=0.0)
        a = tl.abs(x[:, :, None] - ml.to(acc_ty)[:, None, :])  # (BLOCK_P, BLOCK_G, BLOCK_C)
        # padded i or k would add |x - 0| terms: zero them before any sum
        a = tl.where(imask[None, :, None] & kmask[None, None, :], a, 0.0)
        row += tl.sum(a, axis=2)
        # every i is in this tile, so the column sums for this chunk of k are complete
        col = tl.sum(a, axis=1)  # sum_i A[p, i, k]
        tl.store(rl_ptr + pairs[:, None] * G + gk[None, :], 1.0 - col * inv_gr, mask=lmask)
    tl.store(rw_ptr + pairs[:, None] * G + gi[None, :], 1.0 - row * inv_gr, mask=wmask)
    # L_pw = 1/(G^2 R) sum_{i,k} A = (1/G) sum_i row_i / (G R)
    tl.store(lp_ptr + pairs, tl.sum(row, axis=1) * inv_gr / G, mask=pmask)


@triton.jit
def _gap_bwd_kernel(
    mw_ptr, ml_ptr, sw_ptr, sl_ptr, gloss_ptr,  # forward inputs and the upstream gradient (scalar)
    dw_ptr, dl_ptr,  # outputs: d loss / d mu_w (P, G), d loss / d mu_l (P, G)
    stride_wp, stride_wg, stride_lp, stride_lg, stride_sw, stride_sl,
    P, G, scale,  # scale = 1 / (P G^2 R)
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    # gradient derivation. loss = 1/(P G^2 R) sum_{p, i, k} |d[p, i, k]|, d = mu_w,i - mu_l,k - delta_w,
    # and d|d|/dd = sign(d) (the subgradient 0 at d = 0), so
    #   dloss/dmu_w[p, i] =  scale * sum_k sign(d[p, i, k])
    #   dloss/dmu_l[p, k] = -scale * sum_i sign(d[p, i, k])
    # recomputing the signs here costs the same memory traffic as saving them in the forward
    # (read mu again instead of reading saved sums) and saves the forward a write.
    acc_ty = tl.float64 if FP64 else tl.float32
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    gi = tl.arange(0, BLOCK_G)
    pmask = pairs < P
    imask = gi < G
    wmask = pmask[:, None] & imask[None, :]
    mw = tl.load(mw_ptr + pairs[:, None] * stride_wp + gi[None, :] * stride_wg, mask=wmask, other=0.0)
    sw = tl.load(sw_ptr + pairs * stride_sw, mask=pmask, other=0.0).to(acc_ty)
    sl = tl.load(sl_ptr + pairs * stride_sl, mask=pmask, other=0.0).to(acc_ty)
    x = mw.to(acc_ty) - (sw - sl)[:, None]
    g = tl.load(gloss_ptr).to(acc_ty) * scale
    row = tl.zeros([BLOCK_P, BLOCK_G], dtype=acc_ty)
    for k0 in range(0, G, BLOCK_C):
        gk = k0 + tl.arange(0, BLOCK_C)
        kmask = gk < G
        lmask = pmask[:, None] & kmask[None, :]
        ml = tl.load(ml_ptr + pairs[:, None] * stride_lp + gk[None, :] * stride_lg, mask=lmask, other=0.0)
        d = x[:, :, None] - ml.to(acc_ty)[:, None, :]
        sgn = tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)
        sgn = tl.where(imask[None, :, None] & kmask[None, None, :], sgn, 0.0)
        row += tl.sum(sgn, axis=2)
        dl = -g * tl.sum(sgn, axis=1)
        if RNE_BF16:
            dl = _rne_bf16(dl)
        tl.store(dl_ptr + pairs[:, None] * G + gk[None, :], dl.to(dl_ptr.dtype.element_ty), mask=lmask)
    dw = g * row
    if RNE_BF16:
        dw = _rne_bf16(dw)
    tl.store(dw_ptr + pairs[:, None] * G + gi[None, :], dw.to(dw_ptr.dtype.element_ty), mask=wmask)


# -----------------------------------------------------------------------------
# host launchers


def _blocks(p, g, on_gpu):
    block_g = max(2, triton.next_power_of_2(g))
    block_c = min(block_g, 16)  # loser samples per inner step; bounds the tile for large G
    if on_gpu:
        block_p = max(1, 2048 // (block_g * block_c))  # ~2k elements of A per program
    else:
        # the interpreter: few, large programs
        block_p = min(max(1, triton.next_power_of_2(p)), max(1, 131072 // (block_g * block_c)))
    return block_p, block_g, block_c


def _launch_args(mu_w, mu_l, s_w, s_l):
    return (mu_w.stride(0), mu_w.stride(1), mu_l.stride(0), mu_l.stride(1), s_w.stride(0), s_l.stride(0))


class _GapL1Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu_w, mu_l, s_w, s_l, value_range):
        p, g = mu_w.shape
        acc = _acc_dtype(mu_w)
        lpair = torch.empty(p, device=mu_w.device, dtype=acc)
        r_w = torch.empty((p, g), device=mu_w.device, dtype=acc)
        r_l = torch.empty((p, g), device=mu_w.device, dtype=acc)
        block_p, block_g, block_c = _blocks(p, g, mu_w.is_cuda)
        if p > 0:
            _gap_fwd_kernel[(triton.cdiv(p, block_p),)](
                mu_w, mu_l, s_w, s_l, lpair, r_w, r_l,
                *_launch_args(mu_w, mu_l, s_w, s_l),
                p, g, 1.0 / (g * value_range),
                BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_C=block_c, FP64=acc == torch.float64,
                num_warps=4,
            )
        ctx.save_for_backward(mu_w, mu_l, s_w, s_l)
        ctx.value_range = value_range
        ctx.mark_non_differentiable(r_w, r_l)
        return lpair.mean(), r_w, r_l

    @staticmethod
    def backward(ctx, gloss, _gr_w, _gr_l):
        mu_w, mu_l, s_w, s_l = ctx.saved_tensors
        p, g = mu_w.shape
        dw = torch.empty((p, g), device=mu_w.device, dtype=mu_w.dtype)
        dl = torch.empty((p, g), device=mu_l.device, dtype=mu_l.dtype)
        block_p, block_g, block_c = _blocks(p, g, mu_w.is_cuda)
        if p > 0:
            _gap_bwd_kernel[(triton.cdiv(p, block_p),)](
                mu_w, mu_l, s_w, s_l, gloss.contiguous(), dw, dl,
                *_launch_args(mu_w, mu_l, s_w, s_l),
                p, g, 1.0 / (p * g * g * ctx.value_range),
                BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_C=block_c, FP64=_acc_dtype(mu_w) == torch.float64,
                RNE_BF16=not mu_w.is_cuda and torch.bfloat16 in (mu_w.dtype, mu_l.dtype),
                num_warps=4,
            )
        return dw, dl, None, None, None


# -----------------------------------------------------------------------------
# public function


def gap_l1(mu_w, mu_l, s_w, s_l, value_range):
    """Pairwise gap loss (Eq. 11, mean over pairs) and rewards (Eq. 10).

    mu_w, mu_l: (P, G) expected scores of the winner and loser samples; s_w, s_l: (P,) labels;
    value_range: R = S_max - S_min (4 on the 1..5 scale). Returns (loss, r_pw_w, r_pw_l).
    """
    assert mu_w.shape == mu_l.shape and mu_w.dim() == 2, "mu_w and mu_l must both be (P, G)"
    assert s_w.shape == s_l.shape == mu_w.shape[:1], "s_w and s_l must be (P,)"
    if not _use_triton(mu_w):
        return gap_l1_ref(mu_w, mu_l, s_w, s_l, value_range)
    return _GapL1Function.apply(mu_w, mu_l, s_w, s_l, float(value_range))
