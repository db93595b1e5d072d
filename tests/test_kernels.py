"""
Tests of zr_kernels/: every Triton kernel against its PyTorch reference, forward and every gradient.

Run:  python -m pytest tests/test_kernels.py -q          (about 40 s on 2 CPU cores)

Without a GPU the Triton paths run in Triton's interpreter. TRITON_INTERPRET must be set both
when triton is first imported (tests/conftest.py does that, then unsets it) and when @triton.jit
runs, and another test file may already have imported `zr_kernels` without it, so this file does not
rely on the package: a module-scoped fixture sets TRITON_INTERPRET=1, loads private copies of
zr_kernels/score.py, gap.py and logprob.py (their kernels become interpreted functions), and
restores the variable afterwards, so that other test files keep the fast CPU reference path.
With a GPU the same tests run the compiled kernels of the `zr_kernels` package on CUDA tensors.

Tolerances: fp32 is compared with the fp32 reference; for bf16 and fp16 the rule of Cut Cross-Entropy
applies: |kernel - fp64 truth| <= |same-dtype reference - fp64 truth| + a small tol, where the
truth is the reference run in fp64 on the same (bf16-rounded) inputs.
"""

import importlib.util
import os
import pathlib

import pytest
import torch

triton = pytest.importorskip("triton")
import zr_kernels  # noqa: E402
from bench import LargestTensor  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _load_interpreted(name):
    spec = importlib.util.spec_from_file_location(f"_interpreted_kernels_{name}", ROOT / "zr_kernels" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def K():
    """The kernel modules under test: interpreted copies on CPU, the package itself on a GPU."""
    if DEV == "cuda":
        yield zr_kernels
        return
    # tests/conftest.py imported triton under TRITON_INTERPRET=1, which the interpreter needs
    assert type(triton.language.sum).__name__ == "InterpretedFunction", \
        "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1; run through pytest"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mods = {n: _load_interpreted(n) for n in ("score", "gap", "logprob")}
        for mod, fn in ((mods["score"], "_score_fwd_kernel"), (mods["gap"], "_gap_fwd_kernel"),
                        (mods["logprob"], "_logprob_fwd_kernel")):
            assert type(getattr(mod, fn)).__name__ == "InterpretedFunction", "the Triton path would not be tested"
        yield type("Kernels", (), mods)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _check(name, out, same, truth, dtype, slack=0.0):
    """out: kernel; same: the reference in the input dtype; truth: the reference in fp64; slack: the
    rounding the kernel is documented to add beyond the reference's (bf16/fp16 only)."""
    out, same, truth = out.double().cpu(), same.double().cpu(), truth.double().cpu()
    assert out.shape == truth.shape, name
    assert torch.isfinite(out).all() == torch.isfinite(truth).all(), f"{name}: non-finite values"
    scale = truth.abs().max().item() if truth.numel() else 0.0
    if dtype == torch.float32:
        torch.testing.assert_close(out, same, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)
    else:
        err = (out - truth).abs().max().item() if out.numel() else 0.0
        err_ref = (same - truth).abs().max().item() if out.numel() else 0.0
        tol = 1e-4 * scale + 1e-6  # fp32 rounding of the math; bf16 rounding must be no worse than torch's
        assert err <= err_ref + tol + slack, \
            f"{name}: kernel error {err:.3g} > reference error {err_ref:.3g} + {tol:.3g} + slack {slack:.3g}"


def _grads(fn, inputs, weights):
    """Run fn on fresh leaf copies of `inputs`, backprop sum(w * out) for non-ones weights w."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights) if o is not None)
    loss.backward()
    return [o.detach() if o is not None else None for o in outs], [x.grad for x in leaves if x.requires_grad]


# -----------------------------------------------------------------------------
# kernel 1: score distribution


def _score_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 3
    values = torch.linspace(1.0, 5.0, k)
    target = torch.randint(0, k, (n,), generator=g)
    target[::5] = -100  # ignored rows
    tp = torch.softmax(torch.randn(n, k, generator=g) * 2, -1)
    tp[::3, 0] = 0.0  # exact zeros: 0 log 0 = 0
    tp = tp / tp.sum(-1, keepdim=True)
    return logits, values, target, tp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 9, 33])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_score_fused_matches_reference(K, n, k, dtype):
    logits, values, target, tp = _score_inputs(n, k)
    z = logits.to(dtype)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(n, k, generator=g, dtype=torch.float64)] + \
              [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)]
    dev = lambda x: x.to(DEV)  # noqa: E731
    out, (gk,) = _grads(lambda x: K.score.score_fused(x, dev(values), dev(target), dev(tp)), [dev(z)], weights)
    same, (gs,) = _grads(lambda x: zr_kernels.score_ref(x, values, target, tp), [z], weights)
    truth, (gt,) = _grads(lambda x: zr_kernels.score_ref(x, values, target, tp), [z.double()], weights)
    for name, o, s, t in zip(("probs", "mu", "sigma", "ce", "kl"), out, same, truth):
        assert o.dtype == torch.float32
        _check(name, o, s, t, dtype)
    assert gk.dtype == dtype
    _check("d logits", gk, gs, gt, dtype)


@pytest.mark.parametrize("which", ["stats", "ce", "kl"])
def test_score_public_functions(K, which):
    logits, values, target, tp = _score_inputs(300, 9, seed=2)
    g = torch.Generator().manual_seed(3)
    if which == "stats":
        fk = lambda x: K.score.score_stats(x, values.to(DEV))  # noqa: E731
        fr = lambda x: zr_kernels.score_ref(x, values)[:3]  # noqa: E731
        weights = [torch.randn(300, 9, generator=g, dtype=torch.float64)] + \
                  [torch.randn(300, generator=g, dtype=torch.float64) for _ in range(2)]
    elif which == "ce":
        fk = lambda x: K.score.score_ce(x, target.to(DEV))  # noqa: E731
        fr = lambda x: zr_kernels.score_ref(x, target=target)[3]  # noqa: E731
        weights = [torch.randn(300, generator=g, dtype=torch.float64)]
    else:
        fk = lambda x: K.score.score_kl(x, tp.to(DEV))  # noqa: E731
        fr = lambda x: zr_kernels.score_ref(x, target_probs=tp)[4]  # noqa: E731
        weights = [torch.randn(300, generator=g, dtype=torch.float64)]
    out, (gk,) = _grads(fk, [logits.to(DEV)], weights)
    ref, (gr,) = _grads(fr, [logits], weights)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.cpu(), r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gk.cpu(), gr, atol=2e-5, rtol=1e-4)


def test_score_gradcheck_fp64(K):
    # the Triton path accumulates in fp64 for fp64 inputs, so finite differences are meaningful
    logits, values, target, tp = _score_inputs(5, 7, seed=4)
    z = logits.double().to(DEV).requires_grad_()
    v, t, p = values.to(DEV), target.to(DEV), tp.double().to(DEV)
    assert torch.autograd.gradcheck(lambda x: K.score.score_stats(x, v), (z,))
    assert torch.autograd.gradcheck(lambda x: K.score.score_fused(x, v, t, p), (z,))


def test_score_padded_and_extreme_rows(K):
    # rows a caller pads or masks: zero-weighted rows, ignore_index, one-hot (sigma = 0),
    # all-equal, huge logits, and bins masked with -inf
    k = 9
    values = torch.linspace(1.0, 5.0, k)
    z = torch.randn(8, k)
    z[1] = 0.0  # all equal: uniform
    z[2] = -1e4
    z[2, 3] = 1e4  # one-hot within fp32: sigma exactly 0, its gradient must be 0 (not nan)
    z[3] = torch.linspace(-1e4, 1e4, k)
    z[4, :4] = float("-inf")  # bins the caller masked out
    target = torch.tensor([0, 4, 3, 8, 5, -100, 2, -100])
    tp = torch.softmax(torch.randn(8, k), -1)
    tp[4, :4] = 0.0
    tp = tp / tp.sum(-1, keepdim=True)
    row_w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # rows 5, 7 padding
    weights = [row_w[:, None].expand(8, k), row_w, row_w, row_w, row_w]
    for dtype in (torch.float32, torch.bfloat16):
        out, (gk,) = _grads(lambda x: K.score.score_fused(x, values.to(DEV), target.to(DEV), tp.to(DEV)),
                            [z.to(dtype).to(DEV)], weights)
        ref, (gr,) = _grads(lambda x: zr_kernels.score_ref(x, values, target, tp), [z.to(dtype)], weights)
        gk = gk.cpu().float()
        for name, o, r in zip(("probs", "mu", "sigma", "ce", "kl"), out, ref):
            assert torch.isfinite(o).all(), name
            torch.testing.assert_close(o.cpu(), r, atol=1e-4, rtol=1e-4, msg=name)
        assert torch.isfinite(gk).all()
        assert out[2][2].item() == 0.0 and out[0][4, :4].eq(0).all()
        assert gk[5].eq(0).all() and gk[7].eq(0).all(), "padding rows must get exactly zero gradient"
        assert gk[4, :4].eq(0).all(), "masked bins get no gradient"
        torch.testing.assert_close(gk, gr.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    # a one-hot row (sigma = 0): the guarded sigma gradient is 0, not nan, and so are mu's and probs'
    x = z[2:3].clone().to(DEV).requires_grad_()
    probs, mu, sigma = K.score.score_stats(x, values.to(DEV))
    (probs.sum() + mu.sum() + sigma.sum()).backward()
    assert sigma.item() == 0.0 and x.grad.eq(0).all()
    # ignore_index alone: loss 0, gradient exactly 0
    x = z.clone().to(DEV).requires_grad_()
    ce = K.score.score_ce(x, torch.full((8,), -100, device=DEV))
    ce.sum().backward()
    assert ce.eq(0).all() and x.grad.eq(0).all()


def test_score_strided_and_batched_inputs(K):
    # a (B, L, K) view into a wider tensor (e.g. bin logits sliced out of LM logits)
    big = torch.randn(3, 4, 20)
    z = big[..., 5:14]  # (3, 4, 9), not contiguous
    values = torch.linspace(1.0, 5.0, 9)
    target = torch.randint(0, 9, (3, 4))
    probs, mu, sigma, ce, _ = K.score.score_fused(z.to(DEV), values.to(DEV), target.to(DEV))
    rp, rmu, rsig, rce, _ = zr_kernels.score_ref(z, values, target)
    assert probs.shape == (3, 4, 9) and mu.shape == (3, 4)
    for a, b in ((probs, rp), (mu, rmu), (sigma, rsig), (ce, rce)):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)
    # the transposed (K, N) storage of a column-major caller
    zt = torch.randn(9, 50).t()
    torch.testing.assert_close(K.score.score_stats(zt.to(DEV), values.to(DEV))[1].cpu(),
                               zr_kernels.score_ref(zt, values)[1], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# kernel 2: group gap loss and pairwise rewards


def _gap_inputs(p, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.rand(p, 2, g, generator=gen) * 4 + 1  # winners and losers in one (P, 2, G) tensor
    s_l = 1.0 + 0.5 * torch.randint(0, 8, (p,), generator=gen)  # labels on the half-point grid, s_w > s_l
    s_w = (s_l + 0.5 * torch.randint(1, 9, (p,), generator=gen)).clamp_max(5.0)
    return mu, s_w, s_l


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,g", [(1, 1), (7, 8), (100, 1), (33, 5), (1000, 16), (3, 37)])
def test_gap_matches_reference(K, p, g, dtype):
    mu, s_w, s_l = _gap_inputs(p, g)
    mu = mu.to(dtype)
    weights = [torch.tensor(3.7, dtype=torch.float64)]  # upstream gradient of the scalar loss, not 1
    fk = lambda w, l: K.gap.gap_l1(w, l, s_w.to(DEV), s_l.to(DEV), 4.0)[:1]  # noqa: E731
    fr = lambda w, l: zr_kernels.gap_l1_ref(w, l, s_w, s_l, 4.0)[:1]  # noqa: E731
    (lk,), gk = _grads(fk, [mu[:, 0].to(DEV), mu[:, 1].to(DEV)], weights)
    (ls,), gs = _grads(fr, [mu[:, 0], mu[:, 1]], weights)
    (lt,), gt = _grads(fr, [mu[:, 0].double(), mu[:, 1].double()], weights)
    _check("loss", lk, ls, lt, dtype)
    for name, a, b, c in zip(("d mu_w", "d mu_l"), gk, gs, gt):
        assert a.dtype == dtype
        _check(name, a, b, c, dtype)
    _, rwk, rlk = K.gap.gap_l1(mu[:, 0].to(DEV), mu[:, 1].to(DEV), s_w.to(DEV), s_l.to(DEV), 4.0)
    _, rws, rls = zr_kernels.gap_l1_ref(mu[:, 0], mu[:, 1], s_w, s_l, 4.0)
    _, rwt, rlt = zr_kernels.gap_l1_ref(mu[:, 0].double(), mu[:, 1].double(), s_w, s_l, 4.0)
    _check("r_pw_w", rwk, rws, rwt, dtype)
    _check("r_pw_l", rlk, rls, rlt, dtype)


def test_gap_is_eqs_10_and_11_as_written(K):
    # the kernel uses the one-direction form of Eq. 11; check it against the literal two-direction
    # sum with 1/(2 G^2 R), and Eq. 10 with delta_l = s_l - s_w on the loser side
    p, g, r = 6, 4, 4.0
    mu, s_w, s_l = _gap_inputs(p, g, seed=5)
    mu = mu.double()
    side = {"w": mu[:, 0], "l": mu[:, 1]}
    s = {"w": s_w.double(), "l": s_l.double()}
    other = {"w": "l", "l": "w"}
    l_pw = torch.zeros(p, dtype=torch.float64)
    r_pw = {}
    for j in ("w", "l"):
        delta = s[j] - s[other[j]]
        a = ((side[j][:, :, None] - side[other[j]][:, None, :]) - delta[:, None, None]).abs()  # (P, i, k)
        l_pw += a.sum((1, 2)) / (2 * g * g * r)
        r_pw[j] = 1 - a.sum(2) / (g * r)
    loss, r_w, r_l = K.gap.gap_l1(side["w"].to(DEV), side["l"].to(DEV), s["w"].to(DEV), s["l"].to(DEV), r)
    torch.testing.assert_close(loss.cpu(), l_pw.mean())
    torch.testing.assert_close(r_w.cpu(), r_pw["w"])
    torch.testing.assert_close(r_l.cpu(), r_pw["l"])
    # and L_pw = mean_i (1 - r_pw_w) = mean_k (1 - r_pw_l)
    torch.testing.assert_close((1 - r_w).mean(), loss)
    torch.testing.assert_close((1 - r_l).mean(), loss)
    assert not r_w.requires_grad and not r_l.requires_grad


def test_gap_gradcheck_fp64(K):
    mu, s_w, s_l = _gap_inputs(3, 4, seed=6)
    mw = mu[:, 0].double().to(DEV).requires_grad_()
    ml = mu[:, 1].double().to(DEV).requires_grad_()
    sw, sl = s_w.double().to(DEV), s_l.double().to(DEV)
    assert torch.autograd.gradcheck(lambda a, b: K.gap.gap_l1(a, b, sw, sl, 4.0)[0], (mw, ml))


def test_gap_tie_subgradient_and_strides(K):
    # at a tie, |d| has subgradient 0: mu_w - mu_l == s_w - s_l exactly
    mw = torch.tensor([[3.0, 4.0]], device=DEV, requires_grad=True)
    ml = torch.tensor([[2.0, 2.0]], device=DEV, requires_grad=True)
    loss, _, _ = K.gap.gap_l1(mw, ml, torch.tensor([2.0], device=DEV), torch.tensor([1.0], device=DEV), 4.0)
    loss.backward()
    # d = [[0, 0], [1, 1]]: only i = 1 pulls, with sign +1, scale 1 / (P G^2 R) = 1/16
    torch.testing.assert_close(mw.grad.cpu(), torch.tensor([[0.0, 2 / 16]]))
    torch.testing.assert_close(ml.grad.cpu(), torch.tensor([[-1 / 16, -1 / 16]]))
    # views into one (P, 2, G) tensor (strided rows) give the same as contiguous copies
    mu, s_w, s_l = _gap_inputs(9, 6, seed=7)
    mu = mu.to(DEV)
    a = K.gap.gap_l1(mu[:, 0], mu[:, 1], s_w.to(DEV), s_l.to(DEV), 4.0)
    b = K.gap.gap_l1(mu[:, 0].contiguous(), mu[:, 1].contiguous(), s_w.to(DEV), s_l.to(DEV), 4.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


# -----------------------------------------------------------------------------
# kernel 3: fused linear token log-prob


def _lp_inputs(t, v, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (2.0 / d ** 0.5)  # logits of O(2): a peaked-ish softmax
    targets = torch.randint(0, v, (t,), generator=g)
    targets[1::4] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,v,d", [(5, 300, 32), (129, 1000, 48), (64, 512, 64)])
def test_token_logprobs_matches_reference(K, t, v, d, dtype, entropy):
    hidden, weight, targets = _lp_inputs(t, v, d)
    h, w = hidden.to(dtype), weight.to(dtype)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t, generator=g, dtype=torch.float64) for _ in range(2)]
    kw = dict(temperature=0.8, return_entropy=entropy)
    fk = lambda a, b: K.logprob.token_logprobs(a, b, targets.to(DEV), chunk_size=32, **kw)  # noqa: E731
    fr = lambda a, b: zr_kernels.token_logprobs_naive(a, b, targets, **kw)  # noqa: E731
    out, gk = _grads(fk, [h.to(DEV), w.to(DEV)], weights)
    same, gs = _grads(fr, [h, w], weights)
    truth, gt = _grads(fr, [h.double(), w.double()], weights)
    for name, o, s, tr in zip(("logprobs", "entropy"), out, same, truth):
        assert o.dtype == torch.float32
        _check(name, o, s, tr, dtype)
    slack = {"d weight": _dweight_accumulation_slack(h, w, targets, weights, 32, dtype, kw)}
    for name, a, b, c in zip(("d hidden", "d weight"), gk, gs, gt):
        assert a.dtype == dtype
        _check(name, a, b, c, dtype, slack.get(name, 0.0))


def _dweight_accumulation_slack(h, w, targets, weights, chunk, dtype, kw):
    """d weight accumulates across backward chunks in the weight's dtype (zr_kernels/logprob.py's
    docstring says why), so each chunk boundary rounds a partial sum once more than one GEMM does:
    at most u |partial| per element, u the unit roundoff (bf16 2^-8, fp16 2^-11). The slack sums
    u max|partial| over the partial sums after every chunk but the last, computed in fp64."""
    t = h.shape[0]
    if dtype == torch.float32 or t <= chunk:
        return 0.0
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    slack = 0.0
    for end in range(chunk, t, chunk):
        fn = lambda a, b: zr_kernels.token_logprobs_naive(a, b, targets[:end], **kw)  # noqa: E731
        _, (_, partial) = _grads(fn, [h[:end].double(), w.double()], [x[:end] for x in weights])
        slack += u * partial.abs().max().item()
    return slack


def test_token_logprobs_ignored_tokens(K):
    t, v, d = 40, 300, 32
    hidden, weight, targets = _lp_inputs(t, v, d, seed=2)
    h = hidden.to(DEV).requires_grad_()
    w = weight.to(DEV).requires_grad_()
    lp, ent = K.logprob.token_logprobs(h, w, targets.to(DEV), return_entropy=True, chunk_size=16)
    (lp.sum() + 0.5 * ent.sum()).backward()
    ign = (targets == -100).to(DEV)
    assert lp[ign].eq(0).all() and ent[ign].eq(0).all()
    assert h.grad[ign].eq(0).all(), "ignored tokens must get exactly zero gradient"
    # and they leave the weight gradient as if they were not there
    keep = ~ign
    w2 = weight.to(DEV).requires_grad_()
    lp2, ent2 = K.logprob.token_logprobs(hidden.to(DEV)[keep], w2, targets.to(DEV)[keep], return_entropy=True)
    (lp2.sum() + 0.5 * ent2.sum()).backward()
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_token_logprobs_never_builds_full_logits(K, path, monkeypatch):
    # T x V = 12,900 elements; chunk 16 x 100, hidden 129 x 16, weight 100 x 16: none may get near T x V
    t, v, d = 129, 100, 16
    hidden, weight, targets = _lp_inputs(t, v, d, seed=3)
    if path == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        fn, dev = zr_kernels.token_logprobs, "cpu"
    else:
        fn, dev = K.logprob.token_logprobs, DEV
    h = hidden.to(dev).requires_grad_()
    w = weight.to(dev).requires_grad_()
    with LargestTensor() as probe:
        lp, ent = fn(h, w, targets.to(dev), return_entropy=True, chunk_size=16)
        (lp.sum() + ent.sum()).backward()
    assert h.grad is not None and w.grad is not None
    limit = 4 * max(16 * v, t * d, v * d)  # fp32 bytes of the chunk, hidden, weight
    assert probe.nbytes <= limit, f"largest tensor {probe.nbytes} bytes; the fp32 logits are {4 * t * v}"


def test_token_logprobs_chunking_and_reproducibility(K):
    t, v, d = 70, 600, 32
    hidden, weight, targets = _lp_inputs(t, v, d, seed=4)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(t, generator=g, dtype=torch.float64) for _ in range(2)]
    runs = []
    for chunk in (16, 16, 128):
        f = lambda a, b: K.logprob.token_logprobs(a, b, targets.to(DEV), 1.3, True, chunk_size=chunk)  # noqa: E731
        runs.append(_grads(f, [hidden.to(DEV), weight.to(DEV)], weights))
    (o1, g1), (o2, g2), (o3, g3) = runs
    for a, b in zip(o1 + g1, o2 + g2):
        assert torch.equal(a, b), "a seeded run must be bitwise reproducible (no atomics)"
    for a, b in zip(o1 + g1, o3 + g3):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the chunked, checkpointed CPU reference agrees with the naive full-logits one
    fr = lambda a, b: zr_kernels.token_logprobs_ref(a, b, targets, 1.3, True, chunk_size=16)  # noqa: E731
    fn = lambda a, b: zr_kernels.token_logprobs_naive(a, b, targets, 1.3, True)  # noqa: E731
    (ra, ga), (na, gn) = _grads(fr, [hidden, weight], weights), _grads(fn, [hidden, weight], weights)
    for a, b in zip(ra + ga, na + gn):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_token_logprobs_batched_shape(K):
    hidden, weight, targets = _lp_inputs(24, 200, 16, seed=6)
    out = K.logprob.token_logprobs(hidden.view(4, 6, 16).to(DEV), weight.to(DEV), targets.view(4, 6).to(DEV))
    assert out.shape == (4, 6)
    torch.testing.assert_close(out.reshape(-1).cpu(), zr_kernels.token_logprobs_naive(hidden, weight, targets),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_token_logprobs_flat_output_is_not_a_view(K, path, monkeypatch):
    # model.forward returns these log-probs from an FSDP2 root module, which warns on every view
    if path == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        fn, dev = zr_kernels.token_logprobs, "cpu"
    else:
        fn, dev = K.logprob.token_logprobs, DEV
    hidden, weight, targets = _lp_inputs(6, 50, 16, seed=7)
    h = hidden.to(dev).requires_grad_()
    lp, ent = fn(h, weight.to(dev), targets.to(dev), return_entropy=True)
    assert lp._base is None and ent._base is None
    empty = fn(h[:0], weight.to(dev), targets[:0].to(dev))
    assert empty.shape == (0,) and empty._base is None


def test_fp16_inputs(K):
    # any float dtype in: fp16 by the same rule as bf16
    logits, values, target, tp = _score_inputs(50, 9, seed=10)
    w = [torch.randn(50, 9, dtype=torch.float64)] + [torch.randn(50, dtype=torch.float64) for _ in range(4)]
    z = logits.half()
    out, gk = _grads(lambda x: K.score.score_fused(x, values.to(DEV), target.to(DEV), tp.to(DEV)), [z.to(DEV)], w)
    same, gs = _grads(lambda x: zr_kernels.score_ref(x, values, target, tp), [z], w)
    truth, gt = _grads(lambda x: zr_kernels.score_ref(x, values, target, tp), [z.double()], w)
    for name, a, b, c in zip(("probs", "mu", "sigma", "ce", "kl", "d logits"), out + gk, same + gs, truth + gt):
        _check(name, a, b, c, torch.float16)
    mu, s_w, s_l = _gap_inputs(20, 4, seed=11)
    fk = lambda a, b: K.gap.gap_l1(a, b, s_w.to(DEV), s_l.to(DEV), 4.0)[0]  # noqa: E731
    fr = lambda a, b: zr_kernels.gap_l1_ref(a, b, s_w, s_l, 4.0)[0]  # noqa: E731
    wl = [torch.tensor(0.7, dtype=torch.float64)]
    out, gk = _grads(fk, [mu[:, 0].half().to(DEV), mu[:, 1].half().to(DEV)], wl)
    same, gs = _grads(fr, [mu[:, 0].half(), mu[:, 1].half()], wl)
    truth, gt = _grads(fr, [mu[:, 0].half().double(), mu[:, 1].half().double()], wl)
    for name, a, b, c in zip(("loss", "d mu_w", "d mu_l"), out + gk, same + gs, truth + gt):
        _check(name, a, b, c, torch.float16)
    hidden, weight, targets = _lp_inputs(33, 300, 32, seed=12)
    wt = [torch.randn(33, dtype=torch.float64) for _ in range(2)]
    h, wgt = hidden.half(), weight.half()
    fk = lambda a, b: K.logprob.token_logprobs(a, b, targets.to(DEV), return_entropy=True, chunk_size=16)  # noqa: E731
    fr = lambda a, b: zr_kernels.token_logprobs_naive(a, b, targets, return_entropy=True)  # noqa: E731
    out, gk = _grads(fk, [h.to(DEV), wgt.to(DEV)], wt)
    same, gs = _grads(fr, [h, wgt], wt)
    truth, gt = _grads(fr, [h.double(), wgt.double()], wt)
    for name, a, b, c in zip(("logprobs", "entropy", "d hidden", "d weight"), out + gk, same + gs, truth + gt):
        _check(name, a, b, c, torch.float16)


# -----------------------------------------------------------------------------
# dispatch


def test_cpu_tensors_take_the_reference_without_the_interpreter(monkeypatch):
    # other callers (model.py, the training scripts) import the package; on CPU without
    # TRITON_INTERPRET=1 they must get the reference and never launch a kernel
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*a, **k):
        raise AssertionError("the Triton path ran on a CPU tensor")

    monkeypatch.setattr(zr_kernels.score._ScoreFunction, "apply", boom)
    monkeypatch.setattr(zr_kernels.gap._GapL1Function, "apply", boom)
    monkeypatch.setattr(zr_kernels.logprob._TokenLogprobFunction, "apply", boom)
    logits, values, target, tp = _score_inputs(10, 9)
    for a, b in zip(zr_kernels.score_stats(logits, values), zr_kernels.score_ref(logits, values)[:3]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(zr_kernels.score_ce(logits, target), zr_kernels.score_ref(logits, target=target)[3])
    torch.testing.assert_close(zr_kernels.score_kl(logits, tp), zr_kernels.score_ref(logits, target_probs=tp)[4])
    mu, s_w, s_l = _gap_inputs(4, 3)
    for a, b in zip(zr_kernels.gap_l1(mu[:, 0], mu[:, 1], s_w, s_l, 4.0),
                    zr_kernels.gap_l1_ref(mu[:, 0], mu[:, 1], s_w, s_l, 4.0)):
        torch.testing.assert_close(a, b)
    hidden, weight, targets = _lp_inputs(9, 50, 8)
    torch.testing.assert_close(zr_kernels.token_logprobs(hidden, weight, targets),
                               zr_kernels.token_logprobs_naive(hidden, weight, targets))


@pytest.mark.slow
def test_larger_shapes(K):
    # many programs per launch and several vocabulary blocks per split
    logits, values, target, tp = _score_inputs(50_000, 9, seed=8)
    out = K.score.score_fused(logits.to(DEV), values.to(DEV), target.to(DEV), tp.to(DEV))
    ref = zr_kernels.score_ref(logits, values, target, tp)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-4)
    hidden, weight, targets = _lp_inputs(600, 5000, 96, seed=9)
    weights = [torch.randn(600, dtype=torch.float64) for _ in range(2)]
    f = lambda a, b: K.logprob.token_logprobs(a, b, targets.to(DEV), return_entropy=True, chunk_size=256)  # noqa: E731
    fr = lambda a, b: zr_kernels.token_logprobs_naive(a, b, targets, return_entropy=True)  # noqa: E731
    (ok, gk), (orf, gr) = _grads(f, [hidden.to(DEV), weight.to(DEV)], weights), _grads(fr, [hidden, weight], weights)
    for a, b in zip(ok + gk, orf + gr):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)
