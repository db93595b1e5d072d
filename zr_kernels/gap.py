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
def _round_bf16_nearest_even(x):
    # fp32 -> bf16 rounding for the interpreter, whose fp32 -> bf16 cast truncates where a GPU's
    # rounds to nearest even. adding 0x7fff plus the lowest kept bit and clearing the low 16 bits
    # rounds to nearest even, after which the truncating cast is exact.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_shifted_winners(mu_w_ptr, s_w_ptr, s_l_ptr, stride_mu_w_pair, stride_mu_w_sample,
                          stride_s_w, stride_s_l, P, G,
                          BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, FP64: tl.constexpr):
    # this program's pairs (int64 offsets) and winner samples, and x[p, i] = mu_w[p, i] - delta_w[p]:
    # shifting the winner side once makes A[p, i, k] = |x[p, i] - mu_l[p, k]|
    acc_ty = tl.float64 if FP64 else tl.float32
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    winners = tl.arange(0, BLOCK_G)
    pair_mask = pairs < P
    winner_mask = winners < G
    mu_w = tl.load(mu_w_ptr + pairs[:, None] * stride_mu_w_pair + winners[None, :] * stride_mu_w_sample,
                   mask=pair_mask[:, None] & winner_mask[None, :], other=0.0)
    s_w = tl.load(s_w_ptr + pairs * stride_s_w, mask=pair_mask, other=0.0).to(acc_ty)
    s_l = tl.load(s_l_ptr + pairs * stride_s_l, mask=pair_mask, other=0.0).to(acc_ty)
    x = mu_w.to(acc_ty) - (s_w - s_l)[:, None]
    return pairs, winners, pair_mask, winner_mask, x


@triton.jit
def _chunk_gaps(x, mu_l_ptr, k0, pairs, pair_mask, winner_mask, stride_mu_l_pair, stride_mu_l_sample, G,
                BLOCK_C: tl.constexpr, FP64: tl.constexpr):
    # the signed gaps d[p, i, k] = x[p, i] - mu_l[p, k] (A = |d|) for the loser samples k0 ..
    # k0 + BLOCK_C, and where they are valid: padded i or k must not add |x - 0| terms. the forward
    # and the backward both form d through here, so the backward's signs are those of the
    # forward's A, ties included.
    acc_ty = tl.float64 if FP64 else tl.float32
    losers = k0 + tl.arange(0, BLOCK_C)
    loser_mask = losers < G
    mu_l = tl.load(mu_l_ptr + pairs[:, None] * stride_mu_l_pair + losers[None, :] * stride_mu_l_sample,
                   mask=pair_mask[:, None] & loser_mask[None, :], other=0.0)
    d = x[:, :, None] - mu_l.to(acc_ty)[:, None, :]  # (BLOCK_P, BLOCK_G, BLOCK_C)
    valid = winner_mask[None, :, None] & loser_mask[None, None, :]
    return losers, loser_mask, d, valid


@triton.jit
def _gap_fwd_kernel(
    mu_w_ptr, mu_l_ptr, s_w_ptr, s_l_ptr,  # inputs: mu_w (P, G), mu_l (P, G), s_w (P,), s_l (P,)
    loss_ptr, r_w_ptr, r_l_ptr,  # outputs: L_pw (P,), r_pw_w (P, G), r_pw_l (P, G), contiguous
    stride_mu_w_pair, stride_mu_w_sample, stride_mu_l_pair, stride_mu_l_sample, stride_s_w, stride_s_l,
    P, G, inv_gr,  # inv_gr = 1 / (G R)
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    pairs, winners, pair_mask, winner_mask, x = _load_shifted_winners(
        mu_w_ptr, s_w_ptr, s_l_ptr, stride_mu_w_pair, stride_mu_w_sample, stride_s_w, stride_s_l, P, G,
        BLOCK_P, BLOCK_G, FP64)
    row = tl.zeros([BLOCK_P, BLOCK_G], dtype=acc_ty)  # sum_k A[p, i, k]
    for k0 in range(0, G, BLOCK_C):
        losers, loser_mask, d, valid = _chunk_gaps(x, mu_l_ptr, k0, pairs, pair_mask, winner_mask,
                                                stride_mu_l_pair, stride_mu_l_sample, G, BLOCK_C, FP64)
        a = tl.where(valid, tl.abs(d), 0.0)
        row += tl.sum(a, axis=2)
        # every i is in this tile, so the column sums for this chunk of k are complete
        col = tl.sum(a, axis=1)  # sum_i A[p, i, k]
        tl.store(r_l_ptr + pairs[:, None] * G + losers[None, :], 1.0 - col * inv_gr,
                 mask=pair_mask[:, None] & loser_mask[None, :])
    tl.store(r_w_ptr + pairs[:, None] * G + winners[None, :], 1.0 - row * inv_gr,
             mask=pair_mask[:, None] & winner_mask[None, :])
    # L_pw = 1/(G^2 R) sum_{i,k} A = (1/G) sum_i row_i / (G R)
    tl.store(loss_ptr + pairs, tl.sum(row, axis=1) * inv_gr / G, mask=pair_mask)


@triton.jit
def _gap_bwd_kernel(
    mu_w_ptr, mu_l_ptr, s_w_ptr, s_l_ptr, grad_loss_ptr,  # forward inputs and the upstream gradient (scalar)
    grad_mu_w_ptr, grad_mu_l_ptr,  # outputs: d loss / d mu_w (P, G), d loss / d mu_l (P, G), contiguous
    stride_mu_w_pair, stride_mu_w_sample, stride_mu_l_pair, stride_mu_l_sample, stride_s_w, stride_s_l,
    P, G, scale,  # scale = 1 / (P G^2 R)
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
    EMULATE_BF16_RNE: tl.constexpr,
):
    # gradient derivation. loss = 1/(P G^2 R) sum_{p, i, k} |d[p, i, k]|, d = mu_w,i - mu_l,k - delta_w,
    # and d|d|/dd = sign(d) (the subgradient 0 at d = 0), so
    #   dloss/dmu_w[p, i] =  scale * sum_k sign(d[p, i, k])
    #   dloss/dmu_l[p, k] = -scale * sum_i sign(d[p, i, k])
    # recomputing the signs here costs the same memory traffic as saving them in the forward
    # (read mu again instead of reading saved sums) and saves the forward a write.
    acc_ty = tl.float64 if FP64 else tl.float32
    pairs, winners, pair_mask, winner_mask, x = _load_shifted_winners(
        mu_w_ptr, s_w_ptr, s_l_ptr, stride_mu_w_pair, stride_mu_w_sample, stride_s_w, stride_s_l, P, G,
        BLOCK_P, BLOCK_G, FP64)
    g = tl.load(grad_loss_ptr).to(acc_ty) * scale
    row = tl.zeros([BLOCK_P, BLOCK_G], dtype=acc_ty)  # sum_k sign(d[p, i, k])
    for k0 in range(0, G, BLOCK_C):
        losers, loser_mask, d, valid = _chunk_gaps(x, mu_l_ptr, k0, pairs, pair_mask, winner_mask,
                                                stride_mu_l_pair, stride_mu_l_sample, G, BLOCK_C, FP64)
        sgn = tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)
        sgn = tl.where(valid, sgn, 0.0)
        row += tl.sum(sgn, axis=2)
        d_mu_l = -g * tl.sum(sgn, axis=1)
        if EMULATE_BF16_RNE:
            d_mu_l = _round_bf16_nearest_even(d_mu_l)
        tl.store(grad_mu_l_ptr + pairs[:, None] * G + losers[None, :], d_mu_l.to(grad_mu_l_ptr.dtype.element_ty),
                 mask=pair_mask[:, None] & loser_mask[None, :])
    d_mu_w = g * row
    if EMULATE_BF16_RNE:
        d_mu_w = _round_bf16_nearest_even(d_mu_w)
    tl.store(grad_mu_w_ptr + pairs[:, None] * G + winners[None, :], d_mu_w.to(grad_mu_w_ptr.dtype.element_ty),
             mask=pair_mask[:, None] & winner_mask[None, :])


# -----------------------------------------------------------------------------
# host launchers


def _tile_sizes(p, g, on_gpu):
    block_g = max(2, triton.next_power_of_2(g))
    block_c = min(block_g, 16)  # loser samples per inner step; bounds the tile for large G
    if on_gpu:
        block_p = max(1, 2048 // (block_g * block_c))  # ~2k elements of A per program
    else:
        # the interpreter: few, large programs
        block_p = min(max(1, triton.next_power_of_2(p)), max(1, 131072 // (block_g * block_c)))
    return block_p, block_g, block_c


class _GapL1Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu_w, mu_l, s_w, s_l, value_range):
        p, g = mu_w.shape
        acc = _acc_dtype(mu_w)
        loss_per_pair = torch.empty(p, device=mu_w.device, dtype=acc)
        r_w = torch.empty((p, g), device=mu_w.device, dtype=acc)
        r_l = torch.empty((p, g), device=mu_w.device, dtype=acc)
        block_p, block_g, block_c = _tile_sizes(p, g, mu_w.is_cuda)
        if p > 0:
            _gap_fwd_kernel[(triton.cdiv(p, block_p),)](
                mu_w_ptr=mu_w, mu_l_ptr=mu_l, s_w_ptr=s_w, s_l_ptr=s_l,
                loss_ptr=loss_per_pair, r_w_ptr=r_w, r_l_ptr=r_l,
                stride_mu_w_pair=mu_w.stride(0), stride_mu_w_sample=mu_w.stride(1),
                stride_mu_l_pair=mu_l.stride(0), stride_mu_l_sample=mu_l.stride(1),
                stride_s_w=s_w.stride(0), stride_s_l=s_l.stride(0),
                P=p, G=g, inv_gr=1.0 / (g * value_range),
                BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_C=block_c, FP64=acc == torch.float64,
                num_warps=4,
            )
        ctx.save_for_backward(mu_w, mu_l, s_w, s_l)
        ctx.value_range = value_range
        ctx.mark_non_differentiable(r_w, r_l)
        return loss_per_pair.mean(), r_w, r_l

    @staticmethod
    def backward(ctx, grad_loss, _grad_r_w, _grad_r_l):
        mu_w, mu_l, s_w, s_l = ctx.saved_tensors
        p, g = mu_w.shape
        d_mu_w = torch.empty((p, g), device=mu_w.device, dtype=mu_w.dtype)
        d_mu_l = torch.empty((p, g), device=mu_l.device, dtype=mu_l.dtype)
        block_p, block_g, block_c = _tile_sizes(p, g, mu_w.is_cuda)
        if p > 0:
            _gap_bwd_kernel[(triton.cdiv(p, block_p),)](
                mu_w_ptr=mu_w, mu_l_ptr=mu_l, s_w_ptr=s_w, s_l_ptr=s_l, grad_loss_ptr=grad_loss.contiguous(),
                grad_mu_w_ptr=d_mu_w, grad_mu_l_ptr=d_mu_l,
                stride_mu_w_pair=mu_w.stride(0), stride_mu_w_sample=mu_w.stride(1),
                stride_mu_l_pair=mu_l.stride(0), stride_mu_l_sample=mu_l.stride(1),
                stride_s_w=s_w.stride(0), stride_s_l=s_l.stride(0),
                P=p, G=g, scale=1.0 / (p * g * g * ctx.value_range),
                BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_C=block_c, FP64=_acc_dtype(mu_w) == torch.float64,
                # the interpreter (CPU tensors) truncates fp32 -> bf16; a GPU rounds, and compiles this out
                EMULATE_BF16_RNE=not mu_w.is_cuda and torch.bfloat16 in (mu_w.dtype, mu_l.dtype),
                num_warps=4,
            )
        return d_mu_w, d_mu_l, None, None, None


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
