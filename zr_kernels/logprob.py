"""
Fused linear token log-prob: log softmax(hidden @ weight.T / temperature)[t, targets[t]]
without ever holding the (T, V) logits.

This is the memory-critical kernel of the policy-gradient losses (GRPO / GDSO, Eq. 4) and of the
OPD baseline (Eqs. 18-19): every sampled token needs log pi(o_t | o_<t), i.e. a log-softmax over
the whole vocabulary. At Qwen3.5 scale (V = 248,320, D = 5,120, T = 16k tokens) the logits alone
are 8 GB in bf16 and 16 GB in fp32, before the softmax and its gradient double them.

    forward   one Triton kernel: each program owns BLOCK_T tokens and walks the vocabulary in
              BLOCK_V chunks, computing the logit tile h @ W_chunk^T with tl.dot (fp32
              accumulation) and folding it into an online log-sum-exp: the running max m, the
              running sum s = sum exp(z - m), the target logit z_y and, for the entropy,
              a = sum exp(z - m) z. Programs may also split the vocabulary (grid axis 1) so that
              short sequences still fill the GPU; the splits are merged on the host, O(T) work.
              Only lse (T,) and, with the entropy, zbar = E_p[z] (T,) are saved.
    backward  per chunk of C tokens: a Triton kernel recomputes the logit tile from hidden and
              weight, turns it into d loss / d logits with the saved lse (and zbar), and writes
              that (C, V) chunk; two GEMMs then give d hidden = dz @ W and add dz^T @ h into
              d weight. Extra memory: O(T) statistics + one (C, V) chunk.

Public function (Triton on CUDA tensors, or on CPU when TRITON_INTERPRET=1; the reference
otherwise; fp64 inputs and empty batches always take the reference):
    token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                   ignore_index=-100, chunk_size=None) -> logprobs (T,) or (logprobs, entropy)

hidden (T, D) (or (..., D) with targets (...)), weight (V, D) of the same dtype (fp32, fp16 or
bf16), targets integer ids in [0, V) or ignore_index. Outputs are fp32. Ignored tokens get
logprob 0, entropy 0 and no gradient. Both outputs are differentiable w.r.t. hidden and weight.
chunk_size (tokens per backward chunk) trades memory for speed: the backward reads the weight
about three times per chunk, so chunks much below ~256-512 tokens make it bandwidth-bound on an
H100; the default (see _chunk_rows) is 256 tokens at the Qwen3.5 shape, 0.8% of the fp32 logits.
The weight gradient accumulates across chunks in the weight's dtype (as Liger-Kernel does):
an fp32 accumulator would be a second (V, D) buffer, far over the memory target at this scale.
"""

import os

import torch
import torch.utils.checkpoint
import triton
import triton.language as tl


def _use_triton(t):
    # the Triton path runs on CUDA tensors, and on CPU tensors under the interpreter (tests)
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# -----------------------------------------------------------------------------
# PyTorch references


def token_logprobs_naive(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100):
    """The definition, materializing the full (T, V) logits. For tests and small shapes."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # the GEMM runs in the input dtype (fp32 accumulation, output rounded to it), the softmax in fp32
    logits = (hidden @ weight.T).to(acc) / temperature  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    keep = targets != ignore_index
    idx = torch.where(keep, targets, torch.zeros_like(targets)).long().unsqueeze(-1)
    lp = logp.gather(-1, idx).squeeze(-1)
    lp = torch.where(keep, lp, torch.zeros_like(lp))
    if not return_entropy:
        return lp
    ent = -(logp.exp() * logp).sum(-1)  # H = -sum p log p
    return lp, torch.where(keep, ent, torch.zeros_like(ent))


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100,
                       chunk_size=None):
    """The CPU path: the naive definition on chunks of tokens, each chunk checkpointed so that the
    backward recomputes its logits; peak extra memory is one (chunk, V) block, not (T, V)."""
    lead, d = targets.shape, hidden.shape[-1]
    h, y = hidden.reshape(-1, d), targets.reshape(-1)
    t = h.shape[0]
    if t == 0:
        # an empty batch: empty outputs that still connect to hidden and weight (zero gradients)
        empty = (h.sum(-1) + 0 * weight.sum()).float() * 0
        return (_unflatten(empty, lead), _unflatten(empty, lead)) if return_entropy else _unflatten(empty, lead)
    c = chunk_size or _chunk_rows(t, weight.shape[0])
    outs = []
    for c0 in range(0, t, c):
        args = (h[c0:c0 + c], weight, y[c0:c0 + c], temperature, return_entropy, ignore_index)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            outs.append(torch.utils.checkpoint.checkpoint(token_logprobs_naive, *args, use_reentrant=False))
        else:
            outs.append(token_logprobs_naive(*args))
    if not return_entropy:
        return _unflatten(torch.cat(outs), lead)
    return _unflatten(torch.cat([o[0] for o in outs]), lead), _unflatten(torch.cat([o[1] for o in outs]), lead)


def _unflatten(t, lead):
    """(T,) back to the targets' shape. No alias when the shape already matches: FSDP2 warns about
    every view a root module returns (model.forward returns gdso's L_pt log-probs as they come)."""
    return t if t.shape == lead else t.reshape(lead)


# -----------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _round_bf16_nearest_even(x):
    # fp32 -> bf16 rounding for the interpreter, whose fp32 -> bf16 cast truncates where a GPU's
    # rounds to nearest even. adding 0x7fff plus the lowest kept bit and clearing the low 16 bits
    # rounds to nearest even, after which the truncating cast is exact.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _logit_tile(
    hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask,
    stride_hidden_token, stride_hidden_dim, stride_weight_vocab, stride_weight_dim, D, inv_temp,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # z = (h @ W^T) / tau for the tokens `rows` and vocabulary entries `cols`, accumulated in fp32
    # over D in BLOCK_D steps. the forward and the backward both build their tiles here, with the
    # same tile sizes, so the backward recomputes the logits the forward saw: the same products,
    # summed in the same BLOCK_D steps. rows past the tokens and columns past V load zeros, so z
    # is finite (0) there; the callers mask them.
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        h = tl.load(hidden_ptr + rows[:, None] * stride_hidden_token + dims[None, :] * stride_hidden_dim,
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_weight_vocab + dims[None, :] * stride_weight_dim,
                    mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        if DOT_FP32:
            # fp32 operands: fp32 inputs, and the CPU interpreter (whose bf16 dot is wrong)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc * inv_temp


@triton.jit
def _logprob_fwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr,  # inputs: hidden (T, D), weight (V, D), targets (T,)
    max_ptr, sumexp_ptr, target_logit_ptr, sumexp_z_ptr,  # outputs, one row per vocabulary split: (S, T)
    stride_hidden_token, stride_hidden_dim, stride_weight_vocab, stride_weight_dim,
    T, V, D, v_per_split, inv_temp,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # program (pid_t, pid_s) owns BLOCK_T tokens and the vocabulary split
    # [pid_s * v_per_split, (pid_s + 1) * v_per_split); it writes the split's partial statistics
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    y = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    # online log-sum-exp state (Milakov & Gimelshein): after each chunk, m is the max so far and
    # s = sum exp(z - m); a new max rescales the old sums by exp(m_old - m_new)
    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    zy = tl.zeros([BLOCK_T], dtype=tl.float32)  # the target logit, found in exactly one chunk
    a = tl.zeros([BLOCK_T], dtype=tl.float32)  # sum exp(z - m) z, for the entropy
    v_lo = pid_s.to(tl.int64) * v_per_split
    for v0 in range(0, v_per_split, BLOCK_V):
        cols = v_lo + v0 + tl.arange(0, BLOCK_V)  # int64: V * D can pass 2^31
        col_mask = cols < V
        zf = _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask,
                         stride_hidden_token, stride_hidden_dim, stride_weight_vocab, stride_weight_dim,
                         D, inv_temp, BLOCK_T, BLOCK_V, BLOCK_D, DOT_FP32, DOT_PRECISION)
        z = tl.where(col_mask[None, :], zf, float("-inf"))  # columns past V take no probability
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every chunk has a column < V
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # exactly 0 past V
        s = s * alpha + tl.sum(e, axis=1)
        if ENTROPY:
            a = a * alpha + tl.sum(e * zf, axis=1)  # zf, not z: 0 * -inf would be nan
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], zf, 0.0), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * T + rows
    tl.store(max_ptr + out, m, mask=row_mask)
    tl.store(sumexp_ptr + out, s, mask=row_mask)
    tl.store(target_logit_ptr + out, zy, mask=row_mask)
    if ENTROPY:
        tl.store(sumexp_z_ptr + out, a, mask=row_mask)


@triton.jit
def _logprob_bwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr,  # a chunk of C tokens (hidden (C, D), targets (C,)), and the weight
    lse_ptr, zbar_ptr,  # what the forward saved for these tokens, (C,) each
    grad_logprob_ptr, grad_entropy_ptr,  # upstream gradients, (C,) each
    grad_logits_ptr,  # output: d loss / d (hidden @ weight.T) for the chunk, (C, V) contiguous
    stride_hidden_token, stride_hidden_dim, stride_weight_vocab, stride_weight_dim,
    stride_grad_logprob, stride_grad_entropy,
    C, V, D, inv_temp, ignore_index,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GRAD_LOGPROB: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
):
    # gradient derivation, per token, with z = h W^T / tau, p = softmax(z), lse = log sum exp z:
    #   logprob  lp = z_y - lse               -> dlp/dz_j = [j == y] - p_j
    #   entropy  H = -sum p log p = lse - zbar, zbar = sum p z
    #            dH/dz_j = -sum_v (dp_v/dz_j)(log p_v + 1) = -p_j (log p_j + H) = p_j (zbar - z_j)
    #            (using dp_v/dz_j = p_v ([v == j] - p_j) and log p_j = z_j - lse)
    # so dL/dz_j = glp ([j == y] - p_j) + gent p_j (zbar - z_j), and the 1/tau of z = h W^T / tau
    # is folded in here; the host then forms dh = dz W and dW += dz^T h.
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < C
    col_mask = cols < V
    z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask,
                    stride_hidden_token, stride_hidden_dim, stride_weight_vocab, stride_weight_dim,
                    D, inv_temp, BLOCK_T, BLOCK_V, BLOCK_D, DOT_FP32, DOT_PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    y = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    keep = row_mask & (y != ignore_index)  # ignored tokens: zero gradient
    dz = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    if HAS_GRAD_LOGPROB:
        glp = tl.load(grad_logprob_ptr + rows * stride_grad_logprob, mask=row_mask, other=0.0).to(tl.float32)
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        dz += glp[:, None] * (onehot - p)
    if HAS_GRAD_ENTROPY:
        gent = tl.load(grad_entropy_ptr + rows * stride_grad_entropy, mask=row_mask, other=0.0).to(tl.float32)
        zbar = tl.load(zbar_ptr + rows, mask=row_mask, other=0.0)
        dz += gent[:, None] * p * (zbar[:, None] - z)
    # ignored tokens and columns past V get exactly 0
    dz = tl.where(keep[:, None] & col_mask[None, :], dz * inv_temp, 0.0)
    if EMULATE_BF16_RNE:
        dz = _round_bf16_nearest_even(dz)
    tl.store(grad_logits_ptr + rows[:, None] * V + cols[None, :], dz.to(grad_logits_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# -----------------------------------------------------------------------------
# host side


def _chunk_rows(t, v):
    # tokens per backward chunk. memory wants C small: a bf16 (C, V) chunk is under 1% of the fp32
    # (T, V) logits when C <= T / 50. speed wants C large: each chunk reads the weight ~3 times
    # and writes d weight once, ~0.6 C flop per byte, so below ~256-512 rows an H100 waits on
    # memory. take the largest power of two <= T / 50, but at least 256 rows and at most T.
    # T = 16k, V = 248k: C = 256, 127 MB, 0.8% of the fp32 logits (1.6% of bf16 ones).
    c = max(256, t // 50)
    return min(max(1, triton.next_power_of_2(t)), 1 << (c.bit_length() - 1))


def _config(t, v, d, dtype, on_gpu, chunk_size=None):
    cfg = {}
    if on_gpu:
        # tensor-core sized tiles (every tl.dot dimension >= 16), 8 warps for the 128x128 accumulator;
        # 3 pipeline stages of two 16 KB bf16 tiles, 2 for fp32 tiles (twice the shared memory)
        cfg.update(BLOCK_T=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3 if dtype.itemsize == 2 else 2)
        # split the vocabulary across programs until there are ~2 waves of programs
        n_sm = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        n_t = triton.cdiv(t, cfg["BLOCK_T"])
        splits = max(1, min(triton.cdiv(2 * n_sm, n_t), triton.cdiv(v, cfg["BLOCK_V"])))
    else:
        # the interpreter: large tiles, few programs; two vocabulary splits keep the merge tested
        cfg.update(BLOCK_T=min(128, max(16, triton.next_power_of_2(t))), BLOCK_V=256,
                   BLOCK_D=min(128, max(16, triton.next_power_of_2(d))), num_warps=4, num_stages=1)
        splits = min(2, triton.cdiv(v, cfg["BLOCK_V"]))
    per = triton.cdiv(triton.cdiv(v, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    cfg["v_per_split"] = per
    cfg["splits"] = triton.cdiv(v, per)
    cfg["chunk"] = chunk_size or _chunk_rows(t, v)
    # bf16 / fp16 operands go to the tensor cores as they are, except in the interpreter
    cfg["DOT_FP32"] = dtype == torch.float32 or not on_gpu
    cfg["DOT_PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"  # fp32 matches torch's fp32 GEMM
    return cfg


def _forward(h, w, y, inv_temp, entropy, ignore_index, cfg):
    t, d = h.shape
    v = w.shape[0]
    # per vocabulary split: running max, sum exp(z - max), target logit and, for the entropy, sum exp(z - max) z
    stats = torch.empty((4 if entropy else 3, cfg["splits"], t), device=h.device, dtype=torch.float32)
    m, s, zy = stats[0], stats[1], stats[2]
    a = stats[3] if entropy else None
    _logprob_fwd_kernel[(triton.cdiv(t, cfg["BLOCK_T"]), cfg["splits"])](
        hidden_ptr=h, weight_ptr=w, targets_ptr=y,
        max_ptr=m, sumexp_ptr=s, target_logit_ptr=zy, sumexp_z_ptr=a,
        stride_hidden_token=h.stride(0), stride_hidden_dim=h.stride(1),
        stride_weight_vocab=w.stride(0), stride_weight_dim=w.stride(1),
        T=t, V=v, D=d, v_per_split=cfg["v_per_split"], inv_temp=inv_temp,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        ENTROPY=entropy, DOT_FP32=cfg["DOT_FP32"], DOT_PRECISION=cfg["DOT_PRECISION"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # merge the vocabulary splits: lse = M + log sum_s s_s exp(m_s - M); O(S T)
    mx = m.max(dim=0).values
    scale = torch.exp(m - mx)
    tot = (s * scale).sum(0)
    lse = mx + torch.log(tot)
    keep = y != ignore_index
    lp = torch.where(keep, zy.sum(0) - lse, 0.0)
    zbar = ent = None
    if entropy:
        zbar = (a * scale).sum(0) / tot  # E_p[z]
        ent = torch.where(keep, lse - zbar, 0.0)  # H = lse - E_p[z]
    return lp, ent, lse, zbar


def _backward(h, w, y, lse, zbar, glp, gent, inv_temp, ignore_index, cfg, need_dh, need_dw):
    t, d = h.shape
    v = w.shape[0]
    c = min(cfg["chunk"], t)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else None
    dw = torch.zeros_like(w, memory_format=torch.contiguous_format) if need_dw else None
    buf = torch.empty((c, v), device=h.device, dtype=w.dtype)  # the only (C, V) allocation
    zbar = zbar if gent is not None else None  # only the entropy gradient reads it
    chunk = lambda x, c0, c1: None if x is None else x[c0:c1]  # noqa: E731
    for c0 in range(0, t, c):
        c1 = min(t, c0 + c)
        dz = buf[: c1 - c0]
        hc = h[c0:c1]
        _logprob_bwd_kernel[(triton.cdiv(c1 - c0, cfg["BLOCK_T"]), triton.cdiv(v, cfg["BLOCK_V"]))](
            hidden_ptr=hc, weight_ptr=w, targets_ptr=y[c0:c1],
            lse_ptr=lse[c0:c1], zbar_ptr=chunk(zbar, c0, c1),
            grad_logprob_ptr=chunk(glp, c0, c1), grad_entropy_ptr=chunk(gent, c0, c1),
            grad_logits_ptr=dz,
            stride_hidden_token=hc.stride(0), stride_hidden_dim=hc.stride(1),
            stride_weight_vocab=w.stride(0), stride_weight_dim=w.stride(1),
            stride_grad_logprob=None if glp is None else glp.stride(0),
            stride_grad_entropy=None if gent is None else gent.stride(0),
            C=c1 - c0, V=v, D=d, inv_temp=inv_temp, ignore_index=ignore_index,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
            HAS_GRAD_LOGPROB=glp is not None, HAS_GRAD_ENTROPY=gent is not None,
            DOT_FP32=cfg["DOT_FP32"], DOT_PRECISION=cfg["DOT_PRECISION"],
            # the interpreter (CPU tensors) truncates fp32 -> bf16; a GPU rounds, and compiles this out
            EMULATE_BF16_RNE=not h.is_cuda and w.dtype == torch.bfloat16,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        # the two GEMMs of the chunk (cuBLAS on a GPU): dh = dz W, dW += dz^T h
        if need_dh:
            torch.mm(dz, w, out=dh[c0:c1])
        if need_dw:
            dw.addmm_(dz.t(), hc)
    return dh, dw


class _TokenLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, ignore_index, chunk_size):
        t, d = hidden.shape
        cfg = _config(t, weight.shape[0], d, hidden.dtype, hidden.is_cuda, chunk_size)
        inv_temp = 1.0 / temperature
        lp, ent, lse, zbar = _forward(hidden, weight, targets, inv_temp, return_entropy, ignore_index, cfg)
        # saved: the inputs and O(T) statistics; never the logits
        ctx.save_for_backward(hidden, weight, targets, lse, zbar)
        ctx.cfg, ctx.inv_temp, ctx.ignore_index = cfg, inv_temp, ignore_index
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, glp, gent):
        hidden, weight, targets, lse, zbar = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (glp is None and gent is None) or not (need_dh or need_dw):
            return None, None, None, None, None, None, None
        dh, dw = _backward(hidden, weight, targets, lse, zbar, glp, gent, ctx.inv_temp, ctx.ignore_index,
                           ctx.cfg, need_dh, need_dw)
        return dh, dw, None, None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100,
                   chunk_size=None):
    """log softmax(hidden @ weight.T / temperature)[t, targets[t]] per token, fp32, never forming (T, V).

    hidden (T, D) or (..., D); weight (V, D); targets (T,) or (...) token ids, ignore_index -> 0.
    With return_entropy, also the entropy of each token's distribution (differentiable too).
    chunk_size: tokens per backward chunk (memory C * V elements; None = automatic).
    """
    if not _use_triton(hidden) or hidden.dtype == torch.float64 or targets.numel() == 0:
        return token_logprobs_ref(hidden, weight, targets, temperature, return_entropy, ignore_index, chunk_size)
    assert hidden.dtype == weight.dtype, "hidden and weight must share a dtype"
    assert hidden.shape[-1] == weight.shape[1], "hidden (..., D) and weight (V, D) disagree on D"
    lead, d = targets.shape, hidden.shape[-1]
    h, y = hidden.reshape(-1, d), targets.reshape(-1)
    lp, ent = _TokenLogprobFunction.apply(h, weight, y, float(temperature), bool(return_entropy), ignore_index,
                                          chunk_size)
    if return_entropy:
        return _unflatten(lp, lead), _unflatten(ent, lead)
    return _unflatten(lp, lead)
