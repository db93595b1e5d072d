"""
Benchmarks of zr_kernels/: forward+backward time and peak memory, printed as one table with ratios.

    python bench.py                       # every group; full shapes on a GPU, small ones on CPU
    python bench.py --quick               # smaller shapes on a GPU (a couple of minutes)
    python bench.py --only logprob        # one or more groups, comma-separated
    python bench.py --only logprob --logprob-chunks auto,512,2048   # sweep the backward chunk size

Groups (one function each, registered in GROUPS; add end-to-end groups the same way):
    score      kernel 1: softmax / mu / sigma / CE / KL over K = 9 bins, N rows
    gap        kernel 2: the G x G gap loss and rewards, G = 8, P = N / (2 G) pairs
    score_gap  kernels 1 + 2 as GDSO uses them: bin logits -> mu, CE (Eq. 8) -> gap loss (Eq. 11)
    logprob    kernel 3: fused linear token log-prob with per-token upstream gradients (GRPO),
               against eager, torch.compile, Liger-Kernel's fused linear cross-entropy (if
               installed; reduction="none", plus its scalar mean-CE case for reference) and the
               bare matmul (logits, d hidden, d weight: the roofline)

Every variant does the same work: a forward and a backward with the same upstream gradients.
"fwd+bwd ms" is the wall time of one synchronized step between CUDA events: for small inputs that
is the host launching kernels, not the GPU working. "GPU busy ms" is the sum of the step's kernel
times as torch.profiler records them (GPU only): what the kernels themselves cost. "speedup" and
"GPU busy speedup" are the variant's time over ours (above 1: ours is faster); "mem" is the variant's peak
memory over ours. Peak memory on a GPU is torch.cuda.max_memory_allocated above what was allocated
before the step (inputs), so it includes the input gradients. On CPU the reference stands in for
Triton (ours == eager up to dispatch) and memory is the largest single tensor a step creates, so
the CPU table checks the harness and the chunked reference, not the kernels: GPU numbers need a GPU.
Targets on an H100: score_gap >= 3x eager and >= 1.5x torch.compile at N >= 64k; logprob within
1.3x of the matmul, no slower than Liger, peak extra memory < 1% of the (T, V) logits.
"""

import argparse
import datetime
import gc
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import zr_kernels

GROUPS = {}


def group(name):
    def register(fn):
        GROUPS[name] = fn
        return fn
    return register


# -----------------------------------------------------------------------------
# measurement


class LargestTensor(TorchDispatchMode):
    """CPU stand-in for peak memory: the largest tensor (bytes) any op creates during a step, copies
    included (tests/test_kernels.py uses it to check that no step builds the (T, V) logits)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.nbytes = max(self.nbytes, x.numel() * x.element_size())
        return out


def gpu_busy_ms(run, iters):
    """The GPU's own time per step: the sum of every kernel, copy and memset that torch.profiler
    (CUPTI) records over iters steps, divided by iters. Gaps between kernels do not count, so for
    small inputs, where the wall time is the host launching kernels, this is what the kernels cost."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                run()
            torch.cuda.synchronize()
    except RuntimeError as e:  # a machine whose profiler cannot start (CUPTI): the column says "-"
        print(f"# GPU busy time not measured: {str(e).splitlines()[0][:80]}")
        return None
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / iters


def measure(step, leaves, dev, warmup, iters, probe_cpu=True):
    """-> (median ms of step(), peak extra bytes or None, GPU busy ms or None), or (None, reason,
    None) on failure."""
    def run():
        for x in leaves:
            x.grad = None
        step()
    busy = None
    try:
        for _ in range(warmup):
            run()
        times = []
        for _ in range(iters):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                run()
                times.append(1e3 * (time.perf_counter() - t0))
        for x in leaves:
            x.grad = None
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            mem = torch.cuda.max_memory_allocated() - base
            busy = gpu_busy_ms(run, iters)
        elif probe_cpu:
            with LargestTensor() as probe:
                run()
            mem = probe.nbytes
        else:
            mem = None
        return statistics.median(times), mem, busy
    except torch.OutOfMemoryError:
        return None, "OOM", None
    except Exception as e:  # a peer that fails to compile or launch is reported, not fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}", None
    finally:
        for x in leaves:
            x.grad = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def compiled(fn, args):
    return None if args.no_compile else torch.compile(fn, dynamic=False)


def run_variants(rows, grp, shape, variants, leaves, dev, args, note=None):
    """variants: list of (name, step or None); 'ours' must be among them."""
    for name, step in variants:
        if step is None:
            continue
        ms, mem, busy = measure(step, leaves, dev, args.warmup, args.iters, probe_cpu=not name.startswith("compile"))
        rows.append(dict(group=grp, shape=shape, variant=name, ms=ms, mem=mem, busy=busy, note=""))
    if note is not None:
        note(rows)


# -----------------------------------------------------------------------------
# benchmark groups


def _sizes(dev, args):
    if dev.type != "cuda":
        return [16384]  # one shape: each torch.compile costs seconds of CPU
    return [256, 65536, 1 << 20] if args.quick else [256, 4096, 65536, 262144, 1 << 20]


@group("score")
def bench_score(rows, dev, dtype, args):
    k = 9
    values = torch.linspace(1.0, 5.0, k, device=dev)
    for n in _sizes(dev, args):
        logits = (3 * torch.randn(n, k, device=dev)).to(dtype).requires_grad_()
        target = torch.randint(0, k, (n,), device=dev)
        tp = torch.softmax(torch.randn(n, k, device=dev), -1)
        a, b = torch.randn(n, device=dev), torch.randn(n, device=dev)  # upstream gradients, not ones

        def make(fn):
            def step():
                _, mu, sigma, ce, kl = fn(logits, values, target, tp)
                ((mu * a).sum() + (sigma * b).sum() + ce.sum() + kl.sum()).backward()
            return step
        cfn = compiled(zr_kernels.score_ref, args)
        run_variants(rows, "score", f"N={n} K={k}", [
            ("ours", make(zr_kernels.score_fused)),
            ("eager", make(zr_kernels.score_ref)),
            ("compile", make(cfn) if cfn else None),
        ], [logits], dev, args)


@group("gap")
def bench_gap(rows, dev, dtype, args):
    g = 8
    for n in _sizes(dev, args):
        p = max(1, n // (2 * g))
        mu = (1 + 4 * torch.rand(p, 2, g, device=dev)).to(dtype).requires_grad_()
        s_l = 1 + 0.5 * torch.randint(0, 8, (p,), device=dev)
        s_w = (s_l + 0.5 * torch.randint(1, 9, (p,), device=dev)).clamp_max(5.0)

        def make(fn):
            def step():
                loss, r_w, r_l = fn(mu[:, 0], mu[:, 1], s_w, s_l, 4.0)
                loss.backward()
            return step
        cfn = compiled(zr_kernels.gap_l1_ref, args)
        run_variants(rows, "gap", f"P={p} G={g} (N={2 * p * g})", [
            ("ours", make(zr_kernels.gap_l1)),
            ("eager", make(zr_kernels.gap_l1_ref)),
            ("compile", make(cfn) if cfn else None),
        ], [mu], dev, args)


def _score_gap_loss(score_fn, gap_fn, logits, values, target, s_w, s_l, p, g):
    # the direct GDSO terms of Eq. 14 on one batch: pointwise CE (Eq. 8) + pairwise gap (Eq. 11)
    _, mu, _, ce, _ = score_fn(logits, values, target)
    mu = mu.view(p, 2, g)
    loss_pw, r_w, r_l = gap_fn(mu[:, 0], mu[:, 1], s_w, s_l, 4.0)
    return ce.mean() + loss_pw


@group("score_gap")
def bench_score_gap(rows, dev, dtype, args):
    k, g = 9, 8
    values = torch.linspace(1.0, 5.0, k, device=dev)
    for n in _sizes(dev, args):
        p = max(1, n // (2 * g))
        logits = (3 * torch.randn(2 * p * g, k, device=dev)).to(dtype).requires_grad_()
        target = torch.randint(0, k, (2 * p * g,), device=dev)
        s_l = 1 + 0.5 * torch.randint(0, 8, (p,), device=dev)
        s_w = (s_l + 0.5 * torch.randint(1, 9, (p,), device=dev)).clamp_max(5.0)

        def ours_fn(*xs):
            return _score_gap_loss(zr_kernels.score_fused, zr_kernels.gap_l1, *xs)

        def eager_fn(*xs):
            return _score_gap_loss(zr_kernels.score_ref, zr_kernels.gap_l1_ref, *xs)

        def make(fn):
            def step():
                fn(logits, values, target, s_w, s_l, p, g).backward()
            return step
        cfn = compiled(eager_fn, args)
        run_variants(rows, "score_gap", f"N={2 * p * g} K={k} G={g}", [
            ("ours", make(ours_fn)),
            ("eager", make(eager_fn)),
            ("compile", make(cfn) if cfn else None),
        ], [logits], dev, args)


def _liger_loss(reduction):
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction=reduction)


@group("logprob")
def bench_logprob(rows, dev, dtype, args):
    if dev.type != "cuda":
        shapes = [(1024, 16384, 64)]
    elif args.quick:
        shapes = [(4096, 151936, 2048)]
    else:
        shapes = [(4096, 151936, 4096), (16384, 248320, 5120)]  # Qwen3-class and Qwen3.5-scale heads
    # 'auto' is the default chunk of token_logprobs; on a GPU also show a larger one (faster, more memory)
    sweep = args.logprob_chunks or ("auto,1024" if dev.type == "cuda" else "auto")
    chunks = [None if c == "auto" else int(c) for c in sweep.split(",") if c]
    liger_none = _liger_loss("none") if dev.type == "cuda" else None
    liger_mean = _liger_loss("mean") if dev.type == "cuda" else None
    for t, v, d in shapes:
        hidden = torch.randn(t, d, device=dev).to(dtype).requires_grad_()
        weight = (torch.randn(v, d, device=dev) / d ** 0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (t,), device=dev)
        adv = torch.randn(t, device=dev)  # per-token upstream gradient, as GRPO advantages give

        # the same loss everywhere: sum_t A_t log p(y_t), a policy-gradient surrogate
        def make(fn):
            def step():
                (fn(hidden, weight, targets) * adv).sum().backward()
            return step

        def liger_mean_step():
            # Liger's favourite workload, for reference: mean cross-entropy, a scalar upstream
            # gradient, so it can compute every gradient inside the forward (3 GEMMs, not 4)
            liger_mean(weight, hidden, targets).backward()

        def ours(chunk):
            return make(lambda h, w, y: zr_kernels.token_logprobs(h, w, y, chunk_size=chunk))

        def matmul_step():
            # the roofline: the three GEMMs any method needs (logits, d hidden, d weight), nothing else
            logits = hidden @ weight.T
            logits.backward(grad)

        grad = torch.randn(t, v, device=dev, dtype=dtype) if dev.type == "cuda" else torch.randn(t, v, dtype=dtype)
        cfn = compiled(zr_kernels.token_logprobs_naive, args)
        variants = [(f"ours chunk={c or 'auto'}", ours(c)) for c in chunks]
        variants += [
            ("eager", make(zr_kernels.token_logprobs_naive)),
            ("compile", make(cfn) if cfn else None),
            ("liger", make(lambda h, w, y: -liger_none(w, h, y)) if liger_none else None),
            ("liger, mean CE", liger_mean_step if liger_mean else None),
            ("matmul", matmul_step),
        ]
        shape = f"T={t} V={v} D={d}"

        def note(rows, t=t, v=v, d=d, shape=shape):
            mine = [r for r in rows if r["group"] == "logprob" and r["shape"] == shape]
            mm = next((r for r in mine if r["variant"] == "matmul"), None)
            grads = (t * d + v * d) * torch.tensor([], dtype=dtype).element_size()
            for r in mine:
                if r["variant"].startswith("ours") and isinstance(r["mem"], int):
                    # on a GPU: peak minus the input gradients; on CPU: the largest tensor
                    extra = r["mem"] - grads if dev.type == "cuda" else r["mem"]
                    logits = t * v * torch.tensor([], dtype=dtype).element_size()
                    what = "extra" if dev.type == "cuda" else "largest tensor"
                    r["note"] = f"{what} {100 * extra / logits:.2f}% of the {dtype_name(dtype)} logits"
                    if mm and mm["ms"] and r["ms"]:
                        r["note"] = f"{r['ms'] / mm['ms']:.2f}x matmul; " + r["note"]
        run_variants(rows, "logprob", shape, variants, [hidden, weight], dev, args, note=note)
        del grad


# -----------------------------------------------------------------------------
# table


def dtype_name(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def print_table(rows, dev):
    mem_head = "peak MB" if dev.type == "cuda" else "largest MB"
    head = (f"| group | shape | variant | fwd+bwd ms | GPU busy ms | {mem_head} | speedup of ours | "
            f"GPU busy speedup | mem / ours | note |")
    print(head)
    print("|" + "---|" * 10)
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    for r in rows:
        ours = next((o for o in rows if o["group"] == r["group"] and o["shape"] == r["shape"]
                     and o["variant"].startswith("ours")), None)
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else (r["mem"] or "failed")
        busy = f"{r['busy']:.3f}" if r["busy"] is not None else "-"
        mem = f"{r['mem'] / 2**20:.1f}" if isinstance(r["mem"], int) else "-"
        speed = busy_speed = memr = "-"
        if r is not ours and ours:
            speed, busy_speed = ratio(r["ms"], ours["ms"]), ratio(r["busy"], ours["busy"])
            if isinstance(r["mem"], int) and isinstance(ours["mem"], int):
                memr = ratio(r["mem"], ours["mem"])
        print(f"| {r['group']} | {r['shape']} | {r['variant']} | {ms} | {busy} | {mem} | {speed} | {busy_speed} | "
              f"{memr} | {r['note']} |")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="kernel benchmarks (ratios against eager / torch.compile / peers)")
    p.add_argument("--only", type=str, default="", help="comma-separated groups to run (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller shapes (GPU); the CPU shapes are always small")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per variant (0: 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=0, help="untimed iterations first (0: 3 on GPU, 1 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--dtype", type=str, default="",
                   help="input dtype: bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--logprob-chunks", type=str, default="",
                   help="comma-separated backward chunk sizes for ours, 'auto' = the default "
                        "(GPU default: auto,1024)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the inputs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.iters = args.iters or (10 if dev.type == "cuda" else 3)
    args.warmup = args.warmup or (3 if dev.type == "cuda" else 1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "": None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(GROUPS)
    unknown = [n for n in names if n not in GROUPS]
    assert not unknown, f"unknown groups {unknown}; choose from {list(GROUPS)}"
    import triton
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"# bench.py | {datetime.date.today()} | device {where} | torch {torch.__version__} | "
          f"triton {triton.__version__} | dtype {dtype_name(dtype)} | "
          f"median of {args.iters} after {args.warmup} warmup")
    if dev.type != "cuda":
        print("# no GPU: 'ours' runs the PyTorch reference on CPU (Triton needs CUDA), so these numbers only check "
              "the harness and the chunked reference; the GPU numbers and the H100 targets need a GPU.")
    rows = []
    t0 = time.time()
    for name in names:
        GROUPS[name](rows, dev, dtype, args)
    print_table(rows, dev)
    print(f"# total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
