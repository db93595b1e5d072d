"""
Tests of RISD and the OPD baseline (risd.py): the KL loss vanishes with its gradient when the
student equals the teacher, the q_T cache is reused and a stale one refused, the OPD advantage has
the right sign and no gradient through the teacher or pi_old (a two-token toy, where the expected
OPD gradient is the reverse-KL gradient), a mismatched tokenizer and a direct-mode teacher are
refused, the direct student scores with one forward and one token, and end-to-end runs: the KL
falls, resume equals an uninterrupted run, and torchrun (DDP, FSDP2) matches one process.

    python -m pytest tests/test_risd.py -q            # unit tests and short runs (~1 min on 2 cores)
    python -m pytest tests/test_risd.py -q -m slow    # the torchrun runs too

The runs take the shipped tiny base (assets/tiny_base.safetensors) as the teacher and the tiny
student base (assets/tiny_student_base.safetensors, risd.py's default) as the student; where a
test needs teacher and student to be the same model it passes --student explicitly.
"""

import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_update, run_script
from model import BINS, ScoreModel
from risd import (cache_key, check_same_tokenizer, kl_loss, load_teacher, mean_over_traces, opd_loss, read_cache,
                  write_cache)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")
STUDENT = os.path.join(ROOT, "assets", "tiny_student_base.safetensors")
needs_base = pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")
K = len(BINS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(str(out), n=12, seed=0)
    return str(out)


@pytest.fixture(scope="module")
def base():
    return ScoreModel.load(BASE)


def _records(world, n, split="train"):
    from data import load_jsonl

    return load_jsonl(os.path.join(world, f"{split}.jsonl"))[:n]


# -----------------------------------------------------------------------------
# Eq. 15: the KL loss


def test_kl_loss_zero_and_gradient_zero_when_student_equals_teacher():
    logits = (3 * torch.randn(6, K, generator=torch.Generator().manual_seed(0))).requires_grad_()
    q = logits.detach().softmax(-1)
    loss = kl_loss(logits, q)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert logits.grad.abs().max() < 1e-6
    # any other teacher: positive loss and a gradient q_phi - q_T per row, divided by the count
    logits.grad = None
    q_other = torch.randn(6, K).softmax(-1)
    loss = kl_loss(logits, q_other)
    loss.backward()
    assert loss.item() > 0
    torch.testing.assert_close(logits.grad, (logits.detach().softmax(-1) - q_other) / 6)


def test_kl_loss_masks_rows_and_uses_the_given_count():
    logits = torch.randn(4, K, requires_grad=True)
    q = torch.randn(4, K).softmax(-1)
    valid = torch.tensor([True, False, True, True])
    loss = kl_loss(logits, q, valid, n=10.0)
    loss.backward()
    assert (logits.grad[1] == 0).all() and (logits.grad[valid] != 0).any()
    full = kl_loss(logits.detach(), q)
    by_row = torch.stack([kl_loss(logits.detach()[i:i + 1], q[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, by_row.mean())
    torch.testing.assert_close(loss.detach(), by_row[valid].sum() / 10)


@needs_base
def test_kl_gradient_vanishes_through_the_model(base, world):
    # the student's own direct distribution as the teacher target: zero loss, zero parameter gradient
    from PIL import Image

    recs = _records(world, 4)
    images = [Image.open(r["image_path"]).convert("RGB") for r in recs]
    base.zero_grad(set_to_none=True)
    with torch.no_grad():
        q = base.score([r["prompt"] for r in recs], images, [r["dimension"] for r in recs]).probs
    logits = base.score([r["prompt"] for r in recs], images, [r["dimension"] for r in recs]).logits
    loss = kl_loss(logits, q)
    loss.backward()
    grads = [p.grad.abs().max() for p in base.parameters() if p.grad is not None]
    assert grads and abs(loss.item()) < 1e-6 and max(grads) < 1e-5
    base.zero_grad(set_to_none=True)


def test_mean_over_traces_drops_traces_without_a_score():
    probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]],
                          [[0.0, 1.0], [0.9, 0.1], [0.4, 0.6]]])  # (M=2, N=3, K=2)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    q, ok = mean_over_traces(probs, valid)
    torch.testing.assert_close(q[:2], torch.tensor([[0.5, 0.5], [0.5, 0.5]]))  # record 1: trace 2 dropped
    assert ok.tolist() == [True, True, False]  # record 2: both traces failed, skipped


# -----------------------------------------------------------------------------
# the q_T cache


def test_cache_roundtrip_and_stale_keys_are_refused(tmp_path):
    path = str(tmp_path / "qt.safetensors")
    key = cache_key("a" * 64, ["r1", "r2", "r3"], traces=1, temperature=1.0, max_new_tokens=64, teacher_seed=0)
    q, ok = torch.randn(3, K).softmax(-1), torch.tensor([True, False, True])
    write_cache(path, q, ok, key)
    q2, ok2 = read_cache(path, dict(key))
    assert torch.equal(q2, q) and torch.equal(ok2, ok)
    stale = [(cache_key("b" * 64, ["r1", "r2", "r3"], 1, 1.0, 64, 0), "teacher_sha256"),
             (cache_key("a" * 64, ["r1", "r2", "r4"], 1, 1.0, 64, 0), "records_sha256"),
             (cache_key("a" * 64, ["r1", "r2", "r3"], 4, 1.0, 64, 0), "traces"),
             (cache_key("a" * 64, ["r1", "r2", "r3"], 1, 0.7, 64, 0), "temperature")]
    for other, field in stale:
        with pytest.raises(ValueError, match=rf"stale teacher cache .*{field}.*--rebuild-cache"):
            read_cache(path, other)


def _run(args, nproc=1, timeout=300, check=True):
    return run_script("risd.py", args, nproc, check=check, timeout=timeout)


def _kls(log):
    return [float(x) for x in re.findall(r"\| kl ([0-9.]+)", log)]


COMMON = ["--limit", "64", "--batch-size", "16", "--micro-batch", "8", "--eval-every", "0", "--eval-limit", "16",
          "--warmup", "2", "--max-new-tokens", "48"]


@needs_base
def test_cached_run_learns_reuses_its_cache_and_refuses_a_stale_one(world, tmp_path):
    import shutil

    teacher, cache = str(tmp_path / "t.safetensors"), str(tmp_path / "qt.safetensors")
    shutil.copy(BASE, teacher)
    out = str(tmp_path / "s.safetensors")
    args = ["--teacher", teacher, "--data", world, "--cache", cache, *COMMON]
    # 1. builds the cache and trains: the KL to the fixed teacher targets falls
    log = _run([*args, "--out", out, "--steps", "20", "--lr", "3e-3"]).stdout
    assert "wrote teacher cache" in log
    kls = _kls(log)
    # (measured with the shipped base as teacher: the last five steps' mean is ~0.52x the first five's)
    assert len(kls) == 20 and sum(kls[-5:]) / 5 < 0.6 * sum(kls[:5]) / 5, kls
    student = ScoreModel.load(out)
    assert student.metadata["mode"] == "direct" and student.metadata["stage"] == "risd"
    with open(out.removesuffix(".safetensors") + ".eval.json") as f:
        table = json.load(f)["table"]
    assert table["overall"]["tokens"] == 1.0  # eval.py scored it with one output token
    # 2. a second student run reuses the cache: no teacher trace is generated
    log = _run([*args, "--out", str(tmp_path / "s2.safetensors"), "--steps", "1", "--seed", "3"]).stdout
    assert "reusing teacher cache" in log and "wrote teacher cache" not in log
    # 3. the teacher checkpoint changed (another step of GDSO, say): the cache is stale
    model = ScoreModel.load(teacher)
    model.save(teacher, mode="reasoning", step=1)
    res = _run([*args, "--out", str(tmp_path / "s3.safetensors"), "--steps", "1"], check=False)
    assert res.returncode != 0 and "stale teacher cache" in res.stderr and "teacher_sha256" in res.stderr
    log = _run([*args, "--out", str(tmp_path / "s3.safetensors"), "--steps", "1", "--rebuild-cache"]).stdout
    assert "wrote teacher cache" in log


@needs_base
def test_labels_are_not_needed(world, tmp_path):
    # an unlabeled JSONL (no score, no scores) beside the images distills the same way
    src = os.path.join(world, "train.jsonl")
    dst = os.path.join(world, "unlabeled.jsonl")
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            r = json.loads(line)
            g.write(json.dumps({k: r[k] for k in ("id", "prompt", "image", "dimension")}) + "\n")
    log = _run(["--teacher", BASE, "--data", world, "--unlabeled", dst, "--out", str(tmp_path / "u.safetensors"),
                *COMMON, "--steps", "2"]).stdout
    assert len(_kls(log)) == 2


# -----------------------------------------------------------------------------
# Eqs. 18-19: the OPD loss on a two-token toy


def test_opd_advantage_sign_and_stop_gradient():
    # one trajectory of two tokens; the teacher likes token 0 more than the sampling student, token 1 less
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    logp_teacher = torch.log(torch.tensor([[0.8, 0.2]])).requires_grad_()
    logp_old = logp.detach().clone().requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, adv = opd_loss(logp, logp_teacher, logp_old, mask)
    a = torch.log(torch.tensor([1.6, 0.4]))  # A_t = log pi_T - log pi_old
    # loss = -(1/T) sum_t A_t log pi(y_t), T = 2
    assert abs(loss.item() + (a * torch.log(torch.tensor([0.5, 0.5]))).sum().item() / 2) < 1e-6
    assert abs(adv.item() - a.mean().item()) < 1e-6
    loss.backward()
    torch.testing.assert_close(logp.grad, -a[None] / 2)
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # descent raises the token the teacher prefers, lowers the other
    assert logp_teacher.grad is None and logp_old.grad is None  # A_t is a constant (stop-gradient)
    # student equal to the teacher: zero advantage, zero gradient
    logp.grad = None
    loss, adv = opd_loss(logp, logp.detach(), logp.detach(), mask)
    loss.backward()
    assert loss.item() == 0 and adv.item() == 0 and (logp.grad == 0).all()


def test_opd_masks_padding_and_averages_per_sequence():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.3, 0.6, 0.6]])).requires_grad_()
    teacher = torch.log(torch.tensor([[0.8, 0.2, 0.1], [0.6, 0.3, 0.9]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, _ = opd_loss(logp, teacher, logp.detach(), mask)
    loss.backward()
    assert logp.grad[0, 2] == 0  # padding: no gradient
    a = (teacher - logp.detach())
    # each sequence is a token mean (1/T_i), then the mean over the 2 sequences
    torch.testing.assert_close(logp.grad[0, :2], -a[0, :2] / 2 / 2)
    torch.testing.assert_close(logp.grad[1], -a[1] / 3 / 2)


def test_opd_expected_gradient_is_the_reverse_kl_gradient():
    # one-token vocabulary of size 2: E_{y ~ pi}[A(y) grad log pi(y)] = -grad KL(pi || pi_T)
    theta = torch.tensor([0.3, -0.4], requires_grad=True)
    log_t = torch.log(torch.tensor([0.8, 0.2]))
    pi = theta.softmax(-1)
    expected = sum(pi[y].detach() * opd_loss(theta.log_softmax(-1)[y].view(1, 1), log_t[y].view(1, 1),
                                             theta.log_softmax(-1)[y].detach().view(1, 1),
                                             torch.ones(1, 1, dtype=torch.bool))[0] for y in range(2))
    g_opd, = torch.autograd.grad(expected, theta)
    kl = (pi * (pi.log() - log_t)).sum()
    g_kl, = torch.autograd.grad(kl, theta)
    torch.testing.assert_close(g_opd, g_kl)


# -----------------------------------------------------------------------------
# refusals: tokenizer (OPD), teacher mode


@needs_base
def test_a_mismatched_tokenizer_is_refused(base, world, tmp_path):
    import copy

    check_same_tokenizer(base, ScoreModel.load(BASE))  # the same tokenizer loaded twice: accepted
    tok = copy.deepcopy(base.tokenizer)
    tok.add_tokens(["zebra"])
    other = ScoreModel(base.vlm, tok, base.image_processor, source="tiny")
    with pytest.raises(ValueError, match="tokenizer"):
        check_same_tokenizer(base, other)
    # and the script refuses it before any work, with the same message
    path = str(tmp_path / "other_tok.safetensors")
    other.save(path, mode="reasoning")
    res = _run(["--teacher", BASE, "--student", path, "--opd", "--data", world, "--out", str(tmp_path / "o.safetensors"),
                "--steps", "1"], check=False)
    assert res.returncode != 0 and "tokenizers differ" in res.stderr, res.stderr[-2000:]


@needs_base
def test_a_direct_mode_teacher_is_refused(base, tmp_path, capsys):
    path = str(tmp_path / "direct.safetensors")
    base.save(path, mode="direct", stage="sft")
    with pytest.raises(SystemExit) as e:
        load_teacher(path)
    assert e.value.code == 2 and "reasoning-mode teacher" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the student emits one token at scoring time


@needs_base
def test_the_direct_student_scores_with_one_forward_and_no_generate(base, world, monkeypatch):
    import eval as evaluation

    def no_generate(*a, **k):
        raise AssertionError("a direct-mode student must not generate")

    monkeypatch.setattr(base.vlm, "generate", no_generate)
    calls = []
    hook = base.vlm.model.register_forward_hook(lambda m, i, o: calls.append(int(o.last_hidden_state.shape[1])))
    try:
        from PIL import Image

        recs = _records(world, 6, "test")
        images = [Image.open(r["image_path"]).convert("RGB") for r in recs]
        with torch.no_grad():
            out = base.score([r["prompt"] for r in recs], images, "alignment", mode="direct")
        assert len(calls) == 1 and out.traces is None and out.probs.shape == (6, K)
        # the one forward covers the prompt only: the score is read at its last position
        batch = base.encode([r["prompt"] for r in recs], images, "alignment", "direct")
        assert calls[0] == batch["input_ids"].shape[1]
        calls.clear()
        pred = evaluation.predict(base, recs, "direct", batch_size=32, progress=False)
        assert (pred["n_tokens"] == 1).all()
        assert len(calls) == len({r["dimension"] for r in recs})  # one forward per rubric batch
    finally:
        hook.remove()


# -----------------------------------------------------------------------------
# end-to-end: resume, OPD, torchrun


@needs_base
def test_resume_equals_an_uninterrupted_run(world, tmp_path):
    # online targets: the teacher samples inside the loop, so the RNG state must resume exactly too
    full, part = str(tmp_path / "full.safetensors"), str(tmp_path / "part.safetensors")
    args = ["--teacher", BASE, "--data", world, *COMMON, "--steps", "3", "--save-every", "1"]
    log_full = _run([*args, "--out", full]).stdout
    _run([*args, "--out", part, "--stop-after", "2"])
    log = _run([*args, "--out", part, "--resume"]).stdout
    assert "resumed" in log and "step    3" in log
    assert _kls(log)[-1] == _kls(log_full)[-1]
    a, b = load_file(full), load_file(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@needs_base
def test_opd_run_writes_a_reasoning_student(world, tmp_path):
    out = str(tmp_path / "opd.safetensors")
    log = _run(["--teacher", BASE, "--student", BASE, "--data", world, "--opd", "--out", out, *COMMON,
                "--steps", "2", "--batch-size", "8", "--micro-batch", "4"]).stdout
    advs = [float(x) for x in re.findall(r"\| adv ([-+0-9.]+)", log)]
    assert len(advs) == 2 and all(math.isfinite(a) for a in advs)
    # teacher and student start from the same weights: before the first update A_t = 0 on every token
    assert abs(advs[0]) < 1e-4, advs
    m = ScoreModel.load(out)
    assert m.metadata["mode"] == "reasoning" and m.metadata["stage"] == "opd"


@needs_base
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddp", "fsdp2", "opd-fsdp2"])
def test_torchrun_two_ranks_match_one_process(world, tmp_path, variant):
    # fixed targets (a cache built once; greedy rollouts for OPD) make the update independent of the split;
    # micro-batches of 4: two per rank, gradients reduced on the second only
    cache = str(tmp_path / "qt.safetensors")
    # the student is the student base (the default), not the teacher: from the teacher's own
    # weights every OPD advantage is 0 and nothing would move
    args = ["--teacher", BASE, "--data", world, *COMMON, "--steps", "2", "--save-every", "2", "--lr", "3e-3",
            "--micro-batch", "4", "--student", STUDENT]
    if variant.startswith("opd"):
        args += ["--opd", "--temperature", "0", "--lr", "1e-3"]
    else:
        args += ["--cache", cache]
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    _run([*args, "--out", one])
    _run([*args, "--out", two] + (["--fsdp"] if "fsdp" in variant else []), nproc=2)
    assert_same_update(one, two, STUDENT)
