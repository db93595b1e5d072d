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
# Triton kernels: one program holds BLOCK_N rows x BLOCK_K (K padded to a power of two) bins


@triton.jit
def _rne_bf16(x):
    # fp32 -> bf16 rounding for the interpreter: a GPU's cast rounds to nearest even, the
    # interpreter's truncates. adding 0x7fff plus the lowest kept bit and clearing the low 16
    # bits rounds to nearest even, after which the truncating cast is exact.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _score_fwd_kernel(
    z_ptr, v_ptr, t_ptr, p_ptr,  # inputs: logits (N, K), values (K,), target (N,), teacher (N, K)
    q_ptr, mu_ptr, sig_ptr, lse_ptr, ce_ptr, kl_ptr,  # outputs: probs (N, K) and five (N,)
    stride_zn, stride_zk, stride_pn, stride_pk,
    N, K, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS: tl.constexpr, CE: tl.constexpr, KL: tl.constexpr, FP64: tl.constexpr,
):
    acc_ty = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * K > 2^31 is fine
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < N
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    # rows past N load 0 (finite, never stored); bins past K become -inf so they get q = 0
    z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zk, mask=mask, other=0.0)
    z = tl.where(cmask[None, :], z.to(acc_ty), float("-inf"))
    # softmax with the max subtracted; lse is what the backward needs to rebuild q
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, axis=1)
    lse = m + tl.log(s)
    q = e / s[:, None]
    tl.store(lse_ptr + rows, lse, mask=rmask)
    if STATS:
        v = tl.load(v_ptr + cols, mask=cmask, other=0.0).to(acc_ty)
        mu = tl.sum(q * v[None, :], axis=1)
        dv = v[None, :] - mu[:, None]
        # the centred second moment (not E[v^2] - mu^2, which cancels badly); clamp rounding below 0
        var = tl.maximum(tl.sum(q * dv * dv, axis=1), 0.0)
        sig = tl.sqrt(var)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
        tl.store(mu_ptr + rows, mu, mask=rmask)
        tl.store(sig_ptr + rows, sig, mask=rmask)
    if CE:
        # Eq. 8: -log q_t = lse - z_t, picked out of the row with a compare (no gather)
        t = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
        zt = tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
        ce = tl.where(t != ignore_index, lse - zt, 0.0)
        tl.store(ce_ptr + rows, ce, mask=rmask)
    if KL:
        # Eq. 15: sum_k p_k (log p_k - (z_k - lse)); terms with p_k = 0 are 0 (0 log 0 = 0, and
        # they must not see z_k = -inf of a padded or masked bin)
        p = tl.load(p_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pk, mask=mask, other=0.0)
        p = p.to(acc_ty)
        pos = p > 0
        logp = tl.log(tl.where(pos, p, 1.0))
        kl = tl.sum(tl.where(pos, p * (logp - tl.where(pos, z, 0.0) + lse[:, None]), 0.0), axis=1)
        tl.store(kl_ptr + rows, kl, mask=rmask)


@triton.jit
def _score_bwd_kernel(
    z_ptr, v_ptr, t_ptr, p_ptr, lse_ptr, mu_ptr, sig_ptr,  # forward inputs and saved statistics
    gq_ptr, gmu_ptr, gsig_ptr, gce_ptr, gkl_ptr,  # upstream gradients (absent ones are not read)
    dz_ptr,  # output: d loss / d logits (N, K), in the logits dtype
    stride_zn, stride_zk, stride_pn, stride_pk, stride_gqn, stride_gqk,
    stride_gmu, stride_gsig, stride_gce, stride_gkl,
    N, K, ignore_index, sigma_eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_GQ: tl.constexpr, HAS_GMU: tl.constexpr, HAS_GSIG: tl.constexpr,
    HAS_GCE: tl.constexpr, HAS_GKL: tl.constexpr, FP64: tl.constexpr, RNE_BF16: tl.constexpr,
):
    # gradient derivation. with q = softmax(z), any loss that depends on q through a per-bin
    # gradient g_k = dL/dq_k has dL/dz_k = q_k (g_k - sum_j q_j g_j) (the softmax Jacobian
    # diag(q) - q q^T applied to g). the three statistics give
    #   probs:  g_k += gq_k
    #   mu:     dmu/dq_k = v_k                         -> g_k += gmu v_k
    #   sigma:  var = sum q (v - mu)^2; dvar/dq_k = (v_k - mu)^2 - 2 sum_j q_j (v_j - mu) v_k,
    #           and sum_j q_j (v_j - mu) = 0, so       -> g_k += gsig (v_k - mu)^2 / (2 sigma)
    # the two losses are linear in log q, so they skip g:
    #   ce = lse - z_t:                 dce/dz_k = q_k - [k == t]
    #   kl = sum p log p - sum p z + lse sum p:   dkl/dz_k = q_k sum_j p_j - p_k
    acc_ty = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < N
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :] * stride_zk, mask=mask, other=0.0)
    z = tl.where(cmask[None, :], z.to(acc_ty), float("-inf"))
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    q = tl.exp(z - lse[:, None])  # recomputed from the saved lse; padded bins give exactly 0
    dz = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_ty)
    if HAS_GQ or HAS_GMU or HAS_GSIG:
        g = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_ty)
        if HAS_GQ:
            gq = tl.load(gq_ptr + rows[:, None] * stride_gqn + cols[None, :] * stride_gqk, mask=mask, other=0.0)
            g += gq.to(acc_ty)
        if HAS_GMU or HAS_GSIG:
            v = tl.load(v_ptr + cols, mask=cmask, other=0.0).to(acc_ty)
            if HAS_GMU:
                gmu = tl.load(gmu_ptr + rows * stride_gmu, mask=rmask, other=0.0).to(acc_ty)
                g += gmu[:, None] * v[None, :]
            if HAS_GSIG:
                gsig = tl.load(gsig_ptr + rows * stride_gsig, mask=rmask, other=0.0).to(acc_ty)
                mu = tl.load(mu_ptr + rows, mask=rmask, other=0.0)
                sig = tl.load(sig_ptr + rows, mask=rmask, other=1.0)
                # 1 / (2 sigma), guarded: 0 at a (near) one-hot distribution instead of inf
                half_inv = tl.where(sig > sigma_eps, 0.5 / tl.maximum(sig, sigma_eps), 0.0)
                dv = v[None, :] - mu[:, None]
                g += (gsig * half_inv)[:, None] * dv * dv
        dz += q * (g - tl.sum(q * g, axis=1)[:, None])
    if HAS_GCE:
        t = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
        gce = tl.load(gce_ptr + rows * stride_gce, mask=rmask, other=0.0).to(acc_ty)
        gce = tl.where(t != ignore_index, gce, 0.0)  # ignored rows: no gradient at all
        onehot = tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
        dz += gce[:, None] * (q - onehot)
    if HAS_GKL:
        p = tl.load(p_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pk, mask=mask, other=0.0)
        p = p.to(acc_ty)
        gkl = tl.load(gkl_ptr + rows * stride_gkl, mask=rmask, other=0.0).to(acc_ty)
        dz += gkl[:, None] * (q * tl.sum(p, axis=1)[:, None] - p)
    if RNE_BF16:
        dz = _rne_bf16(dz)
    tl.store(dz_ptr + rows[:, None] * K + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# host launchers


def _blocks(n, k, on_gpu):
    block_k = max(2, triton.next_power_of_2(k))
    if on_gpu:
        # ~2k elements per program: a few registers per thread at 4 warps, many programs in flight
        block_n = max(2, 2048 // block_k)
    else:
        # the interpreter costs milliseconds per program and numpy is happy with big tiles
        block_n = min(max(2, triton.next_power_of_2(n)), max(2, 65536 // block_k))
    return block_n, block_k


def _score_forward(z, values, target, target_probs, ignore_index):
    n, k = z.shape
    acc = _acc_dtype(z)
    dev = z.device
    stats, ce_on, kl_on = values is not None, target is not None, target_probs is not None
    lse = torch.empty(n, device=dev, dtype=acc)
    # outputs not asked for point at lse: a real allocation that the kernel never writes through
    q = torch.empty((n, k), device=dev, dtype=acc) if stats else lse
    mu = torch.empty(n, device=dev, dtype=acc) if stats else lse
    sig = torch.empty(n, device=dev, dtype=acc) if stats else lse
    ce = torch.empty(n, device=dev, dtype=acc) if ce_on else lse
    kl = torch.empty(n, device=dev, dtype=acc) if kl_on else lse
    v = values.detach().to(device=dev, dtype=acc).contiguous() if stats else lse
    t = target if ce_on else lse
    p = target_probs.detach() if kl_on else z
    block_n, block_k = _blocks(n, k, z.is_cuda)
    grid = (triton.cdiv(n, block_n),)
    if n > 0:
        _score_fwd_kernel[grid](
            z, v, t, p,
            q, mu, sig, lse, ce, kl,
            z.stride(0), z.stride(1), p.stride(0), p.stride(-1),
            n, k, ignore_index,
            BLOCK_N=block_n, BLOCK_K=block_k,
            STATS=stats, CE=ce_on, KL=kl_on, FP64=acc == torch.float64,
            num_warps=4,
        )
    return (q if stats else None, mu if stats else None, sig if stats else None,
            ce if ce_on else None, kl if kl_on else None, lse)


def _score_backward(z, values, target, target_probs, lse, mu, sig, gq, gmu, gsig, gce, gkl, ignore_index):
    n, k = z.shape
    acc = _acc_dtype(z)
    dz = torch.empty((n, k), device=z.device, dtype=z.dtype)
    dummy = lse  # pointer for inputs a flag says are absent; never read
    v = values.detach().to(device=z.device, dtype=acc).contiguous() if values is not None else dummy
    t = target if target is not None else dummy
    p = target_probs.detach() if target_probs is not None else z
    gq_ = gq if gq is not None else z
    block_n, block_k = _blocks(n, k, z.is_cuda)
    grid = (triton.cdiv(n, block_n),)
    if n > 0:
        _score_bwd_kernel[grid](
            z, v, t, p, lse,
            mu if mu is not None else dummy, sig if sig is not None else dummy,
            gq_, gmu if gmu is not None else dummy, gsig if gsig is not None else dummy,
            gce if gce is not None else dummy, gkl if gkl is not None else dummy,
            dz,
            z.stride(0), z.stride(1), p.stride(0), p.stride(-1), gq_.stride(0), gq_.stride(-1),
            gmu.stride(0) if gmu is not None else 0, gsig.stride(0) if gsig is not None else 0,
            gce.stride(0) if gce is not None else 0, gkl.stride(0) if gkl is not None else 0,
            n, k, ignore_index, SIGMA_EPS,
            BLOCK_N=block_n, BLOCK_K=block_k,
            HAS_GQ=gq is not None, HAS_GMU=gmu is not None, HAS_GSIG=gsig is not None,
            HAS_GCE=gce is not None, HAS_GKL=gkl is not None, FP64=acc == torch.float64,
            RNE_BF16=not z.is_cuda and z.dtype == torch.bfloat16,
            num_warps=4,
        )
    return dz


# -----------------------------------------------------------------------------
# autograd


class _ScoreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, values, target, target_probs, ignore_index):
        # z is (N, K); everything per row is (N,)
        q, mu, sig, ce, kl, lse = _score_forward(z, values, target, target_probs, ignore_index)
        ctx.save_for_backward(z, values, target, target_probs, lse, mu, sig)
        ctx.ignore_index = ignore_index
        # outputs that nobody differentiates arrive as None in backward, and their kernel branch is skipped
        ctx.set_materialize_grads(False)
        return q, mu, sig, ce, kl

    @staticmethod
    def backward(ctx, gq, gmu, gsig, gce, gkl):
        z, values, target, target_probs, lse, mu, sig = ctx.saved_tensors
        if all(g is None for g in (gq, gmu, gsig, gce, gkl)) or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dz = _score_backward(z, values, target, target_probs, lse, mu, sig,
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
