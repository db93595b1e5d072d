"""
Tests of GDSO (gdso.py): every reward and loss term against hand-computed values, advantages,
masking, malformed traces, and end-to-end runs: one process, resume, and 2-process torchrun (gloo)
with DDP and FSDP2 matching one process with the same global batch.

    python -m pytest tests/test_gdso.py -q            # the unit tests and the short runs
    python -m pytest tests/test_gdso.py -q -m slow    # the torchrun runs too

The end-to-end runs start from the shipped tiny base (assets/tiny_base.safetensors).
"""

import os
import re

import pytest
import torch

from conftest import assert_same_update, run_script
from gdso import SCORE_RANGE, direct_losses, gdso_rewards, group_advantages, pointwise_reward, policy_loss, valid_gaps
from zr_kernels.gap import gap_l1_ref
from model import BINS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny_base.safetensors")


def test_pointwise_reward_eq7():
    mu = torch.tensor([[4.0, 3.0, 5.0]])
    s = torch.tensor([4.0])
    # 1 - |mu - s| / 4: 1, 0.75, 0.75
    torch.testing.assert_close(pointwise_reward(mu, s), torch.tensor([[1.0, 0.75, 0.75]]))


def test_rewards_eq10_eq13_by_hand():
    # one pair, G = 2: s_w = 4, s_l = 2 so delta_w = 2, delta_l = -2, R = 4
    mu_w, mu_l = torch.tensor([[4.0, 3.0]]), torch.tensor([[2.0, 3.0]])
    s_w, s_l = torch.tensor([4.0]), torch.tensor([2.0])
    ok = torch.ones(1, 2, dtype=torch.bool)
    r_w, r_l = gdso_rewards(mu_w, mu_l, s_w, s_l, ok, ok, lambda_pt=1.0, lambda_pw=0.0)
    torch.testing.assert_close(r_w, torch.tensor([[1.0, 0.75]]))  # Eq. 7 only
    torch.testing.assert_close(r_l, torch.tensor([[1.0, 0.75]]))
    r_w, r_l = gdso_rewards(mu_w, mu_l, s_w, s_l, ok, ok, lambda_pt=0.0, lambda_pw=1.0)
    # Eq. 10, winner i=0 (mu 4): gaps to losers 4-2=2, 4-3=1; |2-2|+|1-2| = 1 -> 1 - 1/(2*4) = 0.875
    # winner i=1 (mu 3): 3-2=1, 3-3=0; |1-2|+|0-2| = 3 -> 1 - 3/8 = 0.625
    # loser k=0 (mu 2): 2-4=-2, 2-3=-1; |-2+2|+|-1+2| = 1 -> 0.875; loser k=1 (mu 3): -1, 0 -> 1+2=3 -> 0.625
    torch.testing.assert_close(r_w, torch.tensor([[0.875, 0.625]]))
    torch.testing.assert_close(r_l, torch.tensor([[0.875, 0.625]]))
    r_w, _ = gdso_rewards(mu_w, mu_l, s_w, s_l, ok, ok, lambda_pt=0.5, lambda_pw=2.0)
    torch.testing.assert_close(r_w, 0.5 * torch.tensor([[1.0, 0.75]]) + 2.0 * torch.tensor([[0.875, 0.625]]))


def test_rewards_g1_and_ties():
    # G = 1 and a tie in mu: the pair gap is 0 but should be 1 -> r_pw = 1 - 1/4 on both sides
    r_w, r_l = gdso_rewards(torch.tensor([[3.0]]), torch.tensor([[3.0]]), torch.tensor([3.5]), torch.tensor([2.5]),
                            torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), 0.0, 1.0)
    torch.testing.assert_close(r_w, torch.tensor([[0.75]]))
    torch.testing.assert_close(r_l, torch.tensor([[0.75]]))
    assert group_advantages(torch.tensor([[0.3]])).item() == 0.0  # one sample: no baseline, no signal


def test_malformed_trace_gets_the_minimum_reward():
    mu = torch.tensor([[4.0, 1.0, 4.5]])
    valid = torch.tensor([[True, False, True]])
    r_w, r_l = gdso_rewards(mu, mu - 1, torch.tensor([4.0]), torch.tensor([3.0]), valid, valid, 1.0, 1.0)
    assert r_w[0, 1].item() == -1.0 and r_l[0, 1].item() == -1.0  # -lambda_pw, below any valid reward
    assert (r_w[valid] > -1.0).all()


def test_advantages_zero_mean_per_side():
    r = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    a = group_advantages(r)
    torch.testing.assert_close(a.mean(-1), torch.zeros(2, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.std(-1), torch.ones(2, 5), atol=1e-3, rtol=0)
    assert group_advantages(torch.ones(1, 4)).abs().max() == 0  # all tie: no signal


def test_direct_losses_by_hand():
    P, G = 1, 2
    # logits that put all mass on one bin each: mu equals that bin's value
    logits = torch.full((2 * P * G, 9), -30.0)
    picks = [6, 4, 2, 3]  # winners at 4.0, 3.0; losers at 2.0, 2.5
    for row, b in enumerate(picks):
        logits[row, b] = 30.0
    logits.requires_grad_()
    mu = (logits.softmax(-1) * torch.tensor(BINS)).sum(-1)
    labels = torch.tensor([[4.0], [2.0]])
    valid = torch.ones(4, dtype=torch.bool)
    l_pt, l_pw = direct_losses(logits, mu, labels, valid, P, G)
    # L_pt: -log q(s_j); winners' label bin is 6 (4.0): right for sample 0, ~60 nats off for sample 1;
    # losers' label bin is 2 (2.0): right for sample 0, off for 1 -> mean = (0 + 60 + 0 + 60) / 4
    assert abs(l_pt.item() - 30.0) < 1e-3
    # L_pw = 1/(G^2 R) sum_{i,k} |mu_w,i - mu_l,k - 2|: (4-2-2)=0, (4-2.5-2)=-.5, (3-2-2)=-1, (3-2.5-2)=-1.5
    assert abs(l_pw.item() - (0 + 0.5 + 1 + 1.5) / (4 * SCORE_RANGE)) < 1e-5
    (l_pt + l_pw).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # an invalid trace contributes to neither L_pt nor the gradient of L_pw
    logits.grad = None
    valid = torch.tensor([True, False, True, True])
    mu = (logits.softmax(-1) * torch.tensor(BINS)).sum(-1)
    l_pt, l_pw = direct_losses(logits, mu, labels, valid, P, G)
    assert abs(l_pt.item() - 60.0 / 3) < 1e-3
    (l_pt + l_pw).backward()
    assert logits.grad[1].abs().sum() == 0


def test_full_vocabulary_pointwise_loss():
    # with the label tokens' full-vocabulary log-probs given, L_pt is their negative mean over valid traces
    logits = torch.zeros(4, 9, requires_grad=True)
    mu = (logits.softmax(-1) * torch.tensor(BINS)).sum(-1)
    label_lp = torch.tensor([-0.5, -2.0, -1.0, -9.0], requires_grad=True)
    valid = torch.tensor([True, True, True, False])
    l_pt, _ = direct_losses(logits, mu, torch.tensor([[4.0], [2.0]]), valid, 1, 2, label_logprob=label_lp)
    assert abs(l_pt.item() - (0.5 + 2.0 + 1.0) / 3) < 1e-6
    l_pt.backward()
    torch.testing.assert_close(label_lp.grad, torch.tensor([-1 / 3, -1 / 3, -1 / 3, 0.0]))


def test_policy_loss_masks_padding_and_prompt_tokens():
    torch.manual_seed(0)
    logp = torch.randn(3, 6).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(3, 6)
    ref = logp.detach() + 0.1 * torch.randn(3, 6)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, ref, beta=0.1)
    loss.backward()
    assert (logp.grad[~mask] == 0).all() and (logp.grad[mask] != 0).any()
    assert stats["kl"] >= 0 and stats["kl_old"] >= 0
    # by hand for ratio = 1 (pi = pi_old) and beta = 0: loss = -mean over traces of A
    loss, _ = policy_loss(logp.detach(), logp.detach(), adv, mask)
    torch.testing.assert_close(loss, -adv.mean())


def test_policy_loss_clips_the_ratio():
    logp = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 > 1.2: the positive advantage is clipped
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    assert abs(loss.item() + 1.2) < 1e-6 and logp.grad.item() == 0.0


def test_policy_loss_clip_fraction_and_kl_to_pi_old_by_hand():
    # one trace of 4 tokens, A = +1, eps 0.2: log ratios 0, 0.1, 0.5 (clipped), -0.5 (not clipped:
    # for A > 0 only ratio > 1 + eps is); a second trace with A = -1 and log ratio -0.5 (clipped)
    old = torch.zeros(2, 4)
    logp = torch.tensor([[0.0, 0.1, 0.5, -0.5], [-0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    _, stats = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2)
    torch.testing.assert_close(stats["clip"], torch.tensor((1 / 4 + 1 / 1) / 2))
    k3 = lambda d: torch.tensor(d).exp() - 1 - d  # (ratio - 1) - log ratio
    want = ((k3(0.0) + k3(0.1) + k3(0.5) + k3(-0.5)) / 4 + k3(-0.5)) / 2
    torch.testing.assert_close(stats["kl_old"], want)
    _, stats = policy_loss(old, old, torch.tensor([1.0, -1.0]), mask)  # inner step 0: pi = pi_old
    assert stats["clip"] == 0 and stats["kl_old"] == 0


def test_a_malformed_trace_stays_out_of_its_partners_rewards_and_gap_loss():
    g = torch.Generator().manual_seed(0)
    mu_w, mu_l = 1 + 4 * torch.rand(3, 4, generator=g), 1 + 4 * torch.rand(3, 4, generator=g)
    s_w, s_l = torch.tensor([4.0, 3.5, 5.0]), torch.tensor([2.0, 3.0, 1.5])
    ok = torch.ones(3, 4, dtype=torch.bool)
    # all valid: exactly Eqs. 10-11 (the kernel's reference)
    for a, b in zip(valid_gaps(mu_w, mu_l, s_w, s_l, ok, ok), gap_l1_ref(mu_w, mu_l, s_w, s_l, SCORE_RANGE)):
        torch.testing.assert_close(a, b)
    # winner 1 of pair 0 and loser 3 of pair 2 are malformed: whatever their mu, the rest is Eq. 10 / 11
    # over the valid traces alone
    vw, vl = ok.clone(), ok.clone()
    vw[0, 1], vl[2, 3] = False, False
    outs = []
    for junk in (1.0, 5.0):
        w, l = mu_w.clone(), mu_l.clone()
        w[0, 1], l[2, 3] = junk, junk
        w.requires_grad_(), l.requires_grad_()
        loss, r_w, r_l = valid_gaps(w, l, s_w, s_l, vw, vl)
        loss.backward()
        assert w.grad[0, 1] == 0 and l.grad[2, 3] == 0
        outs.append((loss.detach(), r_w[vw], r_l[vl]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    # by hand for pair 0: its losers' r_pw averages over the 3 valid winners only
    keep = [0, 2, 3]
    _, _, r_l_ref = gap_l1_ref(mu_w[0:1, keep], mu_l[0:1], s_w[0:1], s_l[0:1], SCORE_RANGE)
    torch.testing.assert_close(valid_gaps(mu_w, mu_l, s_w, s_l, vw, vl)[2][0], r_l_ref[0])
    # and in the GDSO reward (Eq. 13) and the direct loss L_pw
    r_w, r_l = gdso_rewards(mu_w, mu_l, s_w, s_l, vw, vl, 1.0, 1.0)
    w2 = mu_w.clone()
    w2[0, 1] = 5.0 if mu_w[0, 1] < 3 else 1.0
    r_w2, r_l2 = gdso_rewards(w2, mu_l, s_w, s_l, vw, vl, 1.0, 1.0)
    torch.testing.assert_close(r_w, r_w2)
    torch.testing.assert_close(r_l, r_l2)


# -----------------------------------------------------------------------------
# end-to-end runs of the script

needs_base = pytest.mark.skipif(not os.path.exists(BASE), reason="assets/tiny_base.safetensors not built")


def _run(args, nproc=1, env_extra=None, timeout=300):
    return run_script("gdso.py", args, nproc, env_extra, timeout=timeout).stdout


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path)


COMMON = ["--init", BASE, "--pairs", "4", "--group", "2", "--max-new-tokens", "40", "--eval-every", "0",
          "--eval-limit", "8", "--lr", "1e-3", "--warmup", "1"]


@needs_base
def test_resume_equals_an_uninterrupted_run(world, tmp_path):
    full, part = str(tmp_path / "full.safetensors"), str(tmp_path / "part.safetensors")
    _run([*COMMON, "--data", world, "--out", full, "--steps", "3", "--save-every", "3", "--ref-reset-every", "2"])
    _run([*COMMON, "--data", world, "--out", part, "--steps", "3", "--save-every", "1", "--ref-reset-every", "2",
          "--stop-after", "2"])
    log = _run([*COMMON, "--data", world, "--out", part, "--steps", "3", "--save-every", "1", "--ref-reset-every", "2",
                "--resume"])
    assert "resumed" in log and "step    3" in log
    a, b = _weights(full), _weights(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@needs_base
@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_match_one_process(world, tmp_path, fsdp):
    # sampled rollouts (temperature 1, G = 2): each micro-batch of one pair samples with the seed of
    # its index in the global batch, so 2 ranks x 2 micro-batches draw the traces that 1 process x 4
    # micro-batches draws; gradients are accumulated locally and reduced on the last micro-batch only
    args = [*COMMON, "--data", world, "--steps", "2", "--save-every", "2", "--temperature", "1", "--beta", "0.05",
            "--micro-pairs", "1"]
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    log = _run([*args, "--out", one])
    _run([*args, "--out", two] + (["--fsdp"] if fsdp else []), nproc=2)
    stds = [float(x) for x in re.findall(r"\(std ([0-9.]+)\)", log)]
    assert len(stds) == 2 and max(stds) > 0, "the groups' rewards all tie: zero advantages, no policy gradient"
    assert_same_update(one, two, BASE, min_moved=1e-4)
