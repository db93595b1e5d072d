"""
Score distribution over K rubric bins: softmax, expectation, std, CE and KL in one pass.

The score model reads the logits of K single-token bins at the score position (K = 9 here, the
half-point grid 1.0 .. 5.0; any K <= 64 works) and turns them into

    q = softmax(z)                        the score distribution                      (N, K)
    mu = sum_k q_k v_k                    the expected score, the reward (Eq. 16)      (N,)
    sigma = sqrt(sum_k q_k (v_k - mu)^2)  its spread                                   (N,)
    ce = -log q_target                    pointwise CE against the label bin (Eq. 8)   (N,)
    kl = sum_k p_k (log p_k - log q_k)    forward KL from a teacher p (Eq. 15)         (N,)

All five come out of one read of the row, in one kernel; the backward kernel reads the row again
and recomputes q from the saved log-sum-exp (and mu, sigma), so nothing of size (N, K) is saved
besides the input itself.

Public functions (Triton on CUDA tensors, or on CPU when TRITON_INTERPRET=1; the reference
otherwise):
    score_stats(logits, values) -> (probs, mu, sigma)
    score_ce(logits, target, ignore_index=-100) -> ce
    score_kl(logits, target_probs) -> kl
    score_fused(logits, values=None, target=None, target_probs=None, ignore_index=-100)
        -> (probs, mu, sigma, ce, kl), any of them None when its input is None

Conventions: logits may have any float dtype and any leading shape (..., K); the math runs in
fp32 (fp64 when the logits are fp64, so gradcheck works on the Triton path too) and the outputs
come back in that accumulation dtype. Gradients flow to `logits` from every output; `values`
and `target_probs` are constants (the bin values are fixed, the teacher is frozen). A target
equal to `ignore_index` gives ce = 0 and no gradient. The sigma gradient is 1 / (2 sigma), set
to 0 where sigma <= SIGMA_EPS: sigma = 0 only for a one-hot q, where the true derivative
p_k ((v_k - mu)^2 - var) / (2 sigma) tends to 0 as well, and 0 beats inf * 0 = nan.
"""

import os

import torch
import triton
import triton.language as tl

SIGMA_EPS = 1e-6  # below this sigma the sigma-gradient is taken as 0 (see the module docstring)


def _use_triton(t):
    # the Triton path runs on CUDA tensors, and on CPU tensors under the interpreter (tests)
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _acc_dtype(t):
    # fp32 math for every float dtype, fp64 kept as fp64 (for gradcheck and the fp64 truth)
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# PyTorch reference: the documentation of what the kernels compute, and the CPU path


def _guarded_sqrt(var):
    # sqrt with the derivative 1 / (2 sqrt(var)) replaced by 0 where sqrt(var) <= SIGMA_EPS.
    # the value is exactly sqrt(max(var, 0)); the gradient rides on (var - var.detach()), which
    # is 0 in value and has derivative 1, scaled by the guarded constant.
    sigma = var.clamp_min(0).sqrt()
    inv2 = torch.where(sigma > SIGMA_EPS, 0.5 / sigma.clamp_min(SIGMA_EPS), torch.zeros_like(sigma))
    return sigma.detach() + (var - var.detach()) * inv2.detach()


def score_ref(logits, values=None, target=None, target_probs=None, ignore_index=-100):
    """Reference for score_fused: (probs, mu, sigma, ce, kl), None for what was not asked."""
    z = logits.to(_acc_dtype(logits))  # (..., K)
    logq = torch.log_softmax(z, dim=-1)
    q = logq.exp()
    probs = mu = sigma = ce = kl = None
    if values is not None:
        v = values.detach().to(z.dtype)  # (K,)
        probs = q
        mu = (q * v).sum(-1)  # expected score
        var = (q * (v - mu.unsqueeze(-1)) ** 2).sum(-1)
        sigma = _guarded_sqrt(var)
    if target is not None:
        # Eq. 8: -log q(s_j), 0 (and no gradient) on ignored rows
        keep = target != ignore_index
        idx = torch.where(keep, target, torch.zeros_like(target)).long().unsqueeze(-1)
        nll = -logq.gather(-1, idx).squeeze(-1)
        ce = torch.where(keep, nll, torch.zeros_like(nll))
    if target_probs is not None:
        # Eq. 15: KL(p || q) = sum_k p_k (log p_k - log q_k), with 0 log 0 = 0
        p = target_probs.detach().to(z.dtype)
        logp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
        kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    return probs, mu, sigma, ce, kl


# -----------------------------------------------------------------------------
# Triton kernels: one program holds BLOCK_N rows x BLOCK_K (K padded to a power of two) bins.
# An output or input that a call does not use is passed as None, with its constexpr flag off: the
# branch that would touch it is compiled out (the JIT specializes None as a constexpr), so no
# stand-in tensor is ever passed.


@triton.jit
def _round_bf16_nearest_even(x):
    # fp32 -> bf16 rounding for the interpreter, whose fp32 -> bf16 cast truncates where a GPU's
    # rounds to nearest even. adding 0x7fff plus the lowest kept bit and clearing the low 16 bits
    # rounds to nearest even, after which the truncating cast is exact.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_logit_rows(logits_ptr, stride_row, stride_bin, N, K,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP64: tl.constexpr):
    # this program's rows of logits in the accumulation dtype, and their indices and masks. the
    # forward and the backward both read the row through here, so the backward's q is built from
    # exactly the z the forward saw. rows are int64: N * K may pass 2^31. rows past N load 0
    # (finite, never stored); bins past K become -inf, so they get q = 0.
    acc_ty = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    bins = tl.arange(0, BLOCK_K)
    row_mask = rows < N
    bin_mask = bins < K
    z = tl.load(logits_ptr + rows[:, None] * stride_row + bins[None, :] * stride_bin,
                mask=row_mask[:, None] & bin_mask[None, :], other=0.0)
    z = tl.where(bin_mask[None, :], z.to(acc_ty), float("-inf"))
    return rows, bins, row_mask, bin_mask, z


@triton.jit
def _score_fwd_kernel(
    logits_ptr, values_ptr, target_ptr, teacher_ptr,  # inputs: z (N, K), v (K,), target (N,), p (N, K)
    probs_ptr, mu_ptr, sigma_ptr, lse_ptr, ce_ptr, kl_ptr,  # outputs: q (N, K) contiguous, the rest (N,)
    stride_logits_row, stride_logits_bin, stride_teacher_row, stride_teacher_bin,
    N, K, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS: tl.constexpr, CE: tl.constexpr, KL: tl.constexpr, FP64: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    rows, bins, row_mask, bin_mask, z = _load_logit_rows(
        logits_ptr, stride_logits_row, stride_logits_bin, N, K, BLOCK_N, BLOCK_K, FP64)
    mask = row_mask[:, None] & bin_mask[None, :]
    # softmax with the max subtracted; lse is what the backward needs to rebuild q
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, axis=1)
    lse = m + tl.log(s)
    q = e / s[:, None]
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if STATS:
        v = tl.load(values_ptr + bins, mask=bin_mask, other=0.0).to(acc_ty)
        mu = tl.sum(q * v[None, :], axis=1)
        dv = v[None, :] - mu[:, None]
        # the centred second moment (not E[v^2] - mu^2, which cancels badly); clamp rounding below 0
        var = tl.maximum(tl.sum(q * dv * dv, axis=1), 0.0)
        sigma = tl.sqrt(var)
        tl.store(probs_ptr + rows[:, None] * K + bins[None, :], q, mask=mask)
        tl.store(mu_ptr + rows, mu, mask=row_mask)
        tl.store(sigma_ptr + rows, sigma, mask=row_mask)
    if CE:
        # Eq. 8: -log q_t = lse - z_t, picked out of the row with a compare (no gather)
        t = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
        zt = tl.sum(tl.where(bins[None, :] == t[:, None], z, 0.0), axis=1)
        ce = tl.where(t != ignore_index, lse - zt, 0.0)
        tl.store(ce_ptr + rows, ce, mask=row_mask)
    if KL:
        # Eq. 15: sum_k p_k (log p_k - (z_k - lse)); terms with p_k = 0 are 0 (0 log 0 = 0, and
        # they must not see z_k = -inf of a padded or masked bin)
        p = tl.load(teacher_ptr + rows[:, None] * stride_teacher_row + bins[None, :] * stride_teacher_bin,
                    mask=mask, other=0.0)
        p = p.to(acc_ty)
        pos = p > 0
        logp = tl.log(tl.where(pos, p, 1.0))
        kl = tl.sum(tl.where(pos, p * (logp - tl.where(pos, z, 0.0) + lse[:, None]), 0.0), axis=1)
        tl.store(kl_ptr + rows, kl, mask=row_mask)


@triton.jit
def _score_bwd_kernel(
    logits_ptr, values_ptr, target_ptr, teacher_ptr,  # the forward's inputs
    lse_ptr, mu_ptr, sigma_ptr,  # statistics the forward saved
    grad_probs_ptr, grad_mu_ptr, grad_sigma_ptr, grad_ce_ptr, grad_kl_ptr,  # upstream gradients
    grad_logits_ptr,  # output: d loss / d logits (N, K) contiguous, in the logits dtype
    stride_logits_row, stride_logits_bin, stride_teacher_row, stride_teacher_bin,
    stride_grad_probs_row, stride_grad_probs_bin,
    stride_grad_mu, stride_grad_sigma, stride_grad_ce, stride_grad_kl,
    N, K, ignore_index, sigma_eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_MU: tl.constexpr, HAS_GRAD_SIGMA: tl.constexpr,
    HAS_GRAD_CE: tl.constexpr, HAS_GRAD_KL: tl.constexpr, FP64: tl.constexpr,
    EMULATE_BF16_RNE: tl.constexpr,
):
    # gradient derivation; gq, gmu, gsig, gce, gkl are the upstream gradients of the five outputs.
    # with q = softmax(z), any loss that depends on q through a per-bin gradient g_k = dL/dq_k has
    # dL/dz_k = q_k (g_k - sum_j q_j g_j) (the softmax Jacobian diag(q) - q q^T applied to g).
    # the three statistics give
    #   probs:  g_k += gq_k
    #   mu:     dmu/dq_k = v_k                         -> g_k += gmu v_k
    #   sigma:  var = sum q (v - mu)^2; dvar/dq_k = (v_k - mu)^2 - 2 sum_j q_j (v_j - mu) v_k,
    #           and sum_j q_j (v_j - mu) = 0, so       -> g_k += gsig (v_k - mu)^2 / (2 sigma)
    # the two losses are linear in log q, so they skip g:
    #   ce = lse - z_t:                 dce/dz_k = q_k - [k == t]
    #   kl = sum p log p - sum p z + lse sum p:   dkl/dz_k = q_k sum_j p_j - p_k
    acc_ty = tl.float64 if FP64 else tl.float32
    rows, bins, row_mask, bin_mask, z = _load_logit_rows(
        logits_ptr, stride_logits_row, stride_logits_bin, N, K, BLOCK_N, BLOCK_K, FP64)
    mask = row_mask[:, None] & bin_mask[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    q = tl.exp(z - lse[:, None])  # recomputed from the saved lse; padded bins give exactly 0
    dz = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_ty)
    if HAS_GRAD_PROBS or HAS_GRAD_MU or HAS_GRAD_SIGMA:
        g = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_ty)
        if HAS_GRAD_PROBS:
            gq = tl.load(grad_probs_ptr + rows[:, None] * stride_grad_probs_row
                         + bins[None, :] * stride_grad_probs_bin, mask=mask, other=0.0)
            g += gq.to(acc_ty)
        if HAS_GRAD_MU or HAS_GRAD_SIGMA:
            v = tl.load(values_ptr + bins, mask=bin_mask, other=0.0).to(acc_ty)
            if HAS_GRAD_MU:
                gmu = tl.load(grad_mu_ptr + rows * stride_grad_mu, mask=row_mask, other=0.0).to(acc_ty)
                g += gmu[:, None] * v[None, :]
            if HAS_GRAD_SIGMA:
                gsig = tl.load(grad_sigma_ptr + rows * stride_grad_sigma, mask=row_mask, other=0.0).to(acc_ty)
                mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
                sigma = tl.load(sigma_ptr + rows, mask=row_mask, other=1.0)
                # 1 / (2 sigma), guarded: 0 at a (near) one-hot distribution instead of inf
                half_inv = tl.where(sigma > sigma_eps, 0.5 / tl.maximum(sigma, sigma_eps), 0.0)
                dv = v[None, :] - mu[:, None]
                g += (gsig * half_inv)[:, None] * dv * dv
        dz += q * (g - tl.sum(q * g, axis=1)[:, None])
    if HAS_GRAD_CE:
        t = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
        gce = tl.load(grad_ce_ptr + rows * stride_grad_ce, mask=row_mask, other=0.0).to(acc_ty)
        gce = tl.where(t != ignore_index, gce, 0.0)  # ignored rows: no gradient at all
        onehot = tl.where(bins[None, :] == t[:, None], 1.0, 0.0)
        dz += gce[:, None] * (q - onehot)
    if HAS_GRAD_KL:
        p = tl.load(teacher_ptr + rows[:, None] * stride_teacher_row + bins[None, :] * stride_teacher_bin,
                    mask=mask, other=0.0)
        p = p.to(acc_ty)
        gkl = tl.load(grad_kl_ptr + rows * stride_grad_kl, mask=row_mask, other=0.0).to(acc_ty)
        dz += gkl[:, None] * (q * tl.sum(p, axis=1)[:, None] - p)
    if EMULATE_BF16_RNE:
        dz = _round_bf16_nearest_even(dz)
    tl.store(grad_logits_ptr + rows[:, None] * K + bins[None, :], dz.to(grad_logits_ptr.dtype.element_ty),
             mask=mask)


# -----------------------------------------------------------------------------
# host launchers


def _tile_sizes(n, k, on_gpu):
    block_k = max(2, triton.next_power_of_2(k))
    if on_gpu:
        # ~2k elements per program: a few registers per thread at 4 warps, many programs in flight
        block_n = max(2, 2048 // block_k)
    else:
        # the interpreter costs milliseconds per program and numpy is happy with big tiles
        block_n = min(max(2, triton.next_power_of_2(n)), max(2, 65536 // block_k))
    return block_n, block_k


def _stride(t, dim):
    # the stride of an optional tensor: None goes with its None pointer
    return None if t is None else t.stride(dim)


def _score_forward(z, values, target, teacher, ignore_index):
    """z (N, K); values (K,) in the accumulation dtype or None; target (N,) or None; teacher
    (N, K) or None. -> (probs, mu, sigma, ce, kl, lse), None for each output not asked for."""
    n, k = z.shape
    acc = _acc_dtype(z)
    new = lambda *shape: torch.empty(shape, device=z.device, dtype=acc)  # noqa: E731
    stats = values is not None
    probs, mu, sigma = (new(n, k), new(n), new(n)) if stats else (None, None, None)
    ce = new(n) if target is not None else None
    kl = new(n) if teacher is not None else None
    lse = new(n)
    block_n, block_k = _tile_sizes(n, k, z.is_cuda)
    if n > 0:
        _score_fwd_kernel[(triton.cdiv(n, block_n),)](
            logits_ptr=z, values_ptr=values, target_ptr=target, teacher_ptr=teacher,
            probs_ptr=probs, mu_ptr=mu, sigma_ptr=sigma, lse_ptr=lse, ce_ptr=ce, kl_ptr=kl,
            stride_logits_row=z.stride(0), stride_logits_bin=z.stride(1),
            stride_teacher_row=_stride(teacher, 0), stride_teacher_bin=_stride(teacher, 1),
            N=n, K=k, ignore_index=ignore_index,
            BLOCK_N=block_n, BLOCK_K=block_k,
            STATS=stats, CE=target is not None, KL=teacher is not None, FP64=acc == torch.float64,
            num_warps=4,
        )
    return probs, mu, sigma, ce, kl, lse


def _score_backward(z, values, target, teacher, lse, mu, sigma, gq, gmu, gsig, gce, gkl, ignore_index):
    """d loss / d z (N, K) in z's dtype, from the upstream gradients of the five outputs (None for
    an output nobody differentiated) and what the forward saved."""
    n, k = z.shape
    dz = torch.empty((n, k), device=z.device, dtype=z.dtype)
    has_gq, has_gmu, has_gsig, has_gce, has_gkl = (g is not None for g in (gq, gmu, gsig, gce, gkl))
    # each input goes in only when a branch that reads it is on, so the None pointers follow the flags
    values = values if has_gmu or has_gsig else None
    mu, sigma = (mu, sigma) if has_gsig else (None, None)
    target = target if has_gce else None
    teacher = teacher if has_gkl else None
    block_n, block_k = _tile_sizes(n, k, z.is_cuda)
    if n > 0:
        _score_bwd_kernel[(triton.cdiv(n, block_n),)](
            logits_ptr=z, values_ptr=values, target_ptr=target, teacher_ptr=teacher,
            lse_ptr=lse, mu_ptr=mu, sigma_ptr=sigma,
            grad_probs_ptr=gq, grad_mu_ptr=gmu, grad_sigma_ptr=gsig, grad_ce_ptr=gce, grad_kl_ptr=gkl,
            grad_logits_ptr=dz,
            stride_logits_row=z.stride(0), stride_logits_bin=z.stride(1),
            stride_teacher_row=_stride(teacher, 0), stride_teacher_bin=_stride(teacher, 1),
            stride_grad_probs_row=_stride(gq, 0), stride_grad_probs_bin=_stride(gq, 1),
            stride_grad_mu=_stride(gmu, 0), stride_grad_sigma=_stride(gsig, 0),
            stride_grad_ce=_stride(gce, 0), stride_grad_kl=_stride(gkl, 0),
            N=n, K=k, ignore_index=ignore_index, sigma_eps=SIGMA_EPS,
            BLOCK_N=block_n, BLOCK_K=block_k,
            HAS_GRAD_PROBS=has_gq, HAS_GRAD_MU=has_gmu, HAS_GRAD_SIGMA=has_gsig,
            HAS_GRAD_CE=has_gce, HAS_GRAD_KL=has_gkl, FP64=_acc_dtype(z) == torch.float64,
            # the interpreter (CPU tensors) truncates fp32 -> bf16; a GPU rounds, and compiles this out
            EMULATE_BF16_RNE=not z.is_cuda and z.dtype == torch.bfloat16,
            num_warps=4,
        )
    return dz


# -----------------------------------------------------------------------------
# autograd


class _ScoreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, values, target, target_probs, ignore_index):
        # z is (N, K); everything per row is (N,). the bin values enter the kernels in the
        # accumulation dtype; the teacher is a constant
        if values is not None:
            values = values.detach().to(device=z.device, dtype=_acc_dtype(z)).contiguous()
        teacher = target_probs.detach() if target_probs is not None else None
        q, mu, sigma, ce, kl, lse = _score_forward(z, values, target, teacher, ignore_index)
        ctx.save_for_backward(z, values, target, teacher, lse, mu, sigma)
        ctx.ignore_index = ignore_index
        # outputs that nobody differentiates arrive as None in backward, and their kernel branch is skipped
        ctx.set_materialize_grads(False)
        return q, mu, sigma, ce, kl

    @staticmethod
    def backward(ctx, gq, gmu, gsig, gce, gkl):
        z, values, target, teacher, lse, mu, sigma = ctx.saved_tensors
        if all(g is None for g in (gq, gmu, gsig, gce, gkl)) or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dz = _score_backward(z, values, target, teacher, lse, mu, sigma,
                             gq, gmu, gsig, gce, gkl, ctx.ignore_index)
        return dz, None, None, None, None


# -----------------------------------------------------------------------------
# public functions


def score_fused(logits, values=None, target=None, target_probs=None, ignore_index=-100):
    """Everything at once, one pass over the rows: (probs, mu, sigma, ce, kl).

    logits (..., K); values (K,) turns on probs / mu / sigma; target (...,) integer bin indices
    turns on ce (Eq. 8); target_probs (..., K) turns on kl (Eq. 15). Outputs not asked for are None.
    """
    if not _use_triton(logits):
        return score_ref(logits, values, target, target_probs, ignore_index)
    lead, k = logits.shape[:-1], logits.shape[-1]
    z = logits.reshape(-1, k)
    t = target.reshape(-1) if target is not None else None
    p = target_probs.reshape(-1, k) if target_probs is not None else None
    q, mu, sig, ce, kl = _ScoreFunction.apply(z, values, t, p, ignore_index)
    shape = lambda x, *tail: x.reshape(*lead, *tail) if x is not None else None  # noqa: E731
    return shape(q, k), shape(mu), shape(sig), shape(ce), shape(kl)


def score_stats(logits, values):
    """probs (..., K), mu (...,), sigma (...,) of softmax(logits) over the bin values (K,)."""
    probs, mu, sigma, _, _ = score_fused(logits, values=values)
    return probs, mu, sigma


def score_ce(logits, target, ignore_index=-100):
    """-log softmax(logits)[target] per row (Eq. 8); 0 where target == ignore_index."""
    return score_fused(logits, target=target, ignore_index=ignore_index)[3]


def score_kl(logits, target_probs):
    """KL(target_probs || softmax(logits)) per row (Eq. 15), with 0 log 0 = 0."""
    return score_fused(logits, target_probs=target_probs)[4]
