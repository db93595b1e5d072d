"""
GDSO: Group-wise Direct Score Optimization of the reasoning teacher (Z-Reward, Sec. 3, Algorithm 1).

One training item is a same-prompt, same-dimension pair (p, I_w, I_l, s_w, s_l, d) with s_w > s_l.
For each side j the policy samples G outputs o_{j,i} = (reasoning trace, "Score: N"); the score
distribution q_{j,i} at the score token gives mu_{j,i}. Then, with R = S_max - S_min (SCORE_RANGE):

1. Rewards from the distribution's expectation (not the parsed text): the pointwise reward
   r_pt = 1 - |mu - s_j| / R (Eq. 7) and the pairwise reward r_pw (Eq. 10) over the G x G cross
   pairs, combined r = lambda_pt r_pt + lambda_pw r_pw (Eq. 13). A trace that never reaches a score
   token within the length budget gets the minimum reward (-lambda_pw) and no direct-loss term.
2. Advantages per side over its G samples, A_i = (r_i - mean r) / (std r + eps) (Eq. 3).
3. Policy loss (Eq. 4): Algorithm 1 samples from pi_old and takes K_gdso gradient steps per batch,
   so we use the PPO clipped-ratio surrogate per token (ratio pi_theta / pi_old, clip eps), averaged
   over each trace's tokens then over traces, plus beta times the k3 estimate of KL(pi || pi_ref).
   pi_ref is reset to the current policy at the start of every outer iteration (every
   --ref-reset-every steps); with beta = 0 no reference model is kept or run. The traces are
   sampled from exactly softmax(logits / T) (no top-k / top-p / repetition penalty, whatever the
   checkpoint's generation config says), and every log-prob of the ratio and the KL is read at
   that T.
4. Direct losses, differentiable through the score-token logits given the sampled trace:
   alpha_pt * L_pt, the CE of the label's bin (Eq. 8), and alpha_pw * L_pw, the L1 loss on the
   score gap over all G x G cross pairs (Eq. 11). Total (Eq. 14): L_GRPO + alpha_pt L_pt + alpha_pw L_pw.
   Changed: L_pt is -log p(label's bin token) against the whole vocabulary at the score position,
   i.e. -log q(s) - log P(the score token is a bin). The second term is ~0 while the format holds;
   without it (--no-full-vocab-ce, Eq. 8 over the K bins only) the CE is blind to the mass the
   score position gives to non-bin tokens, so nothing stops Adam from moving that mass off the
   bins, and the traces stop reaching a score token (docs/LOG.md).
5. Baselines from the same script: --method grpo (expectation reward, alphas = 0), and
   --reward-from parsed, the ablation that rewards the score written in the trace instead of mu.

One iteration of main's loop is one step of Algorithm 1: sample, score, reward, then K_gdso
updates. Its log line gives the rollouts' reward, valid fraction and length, then each update's
quantities once per inner step k = 0 .. K_gdso - 1, joined by "/" (at k = 0 pi_theta = pi_old:
the ratio is 1, nothing is clipped and the KL to pi_old is 0).

Memory: --micro-samples S runs each micro-batch's forward and backward in chunks of S of its
2 x micro-pairs x G samples, so that the activations are those of S sequences, with the gradient
of the whole micro-batch (up to summation order). The policy loss and L_pt are sums over samples:
each chunk adds its share. L_pw compares every winner with every loser of a pair, so with
alpha_pw > 0 a no-grad forward of the micro-batch comes first (gap_gradient): one extra forward
per micro-batch and update, the price of not holding all samples' activations at once.
--offload keeps AdamW's state and pi_ref in host memory while a phase does not use them (main's
loop says which phase holds what: offload.keep), and --layerwise-rollout samples with one unit
gathered at a time (common.rollout_mode); neither changes a number. On 8 x 80 GB GDSO 27B takes
--micro-samples 2 --offload (memory_plan.py; docs/REAL_SCALE.md).

Hyperparameters are not published; the defaults are what worked in the tiny world (docs/LOG.md).
Labels off the half-point grid (aggregates of annotations) use their nearest bin for L_pt and
their exact value for the rewards and L_pw.

Launch:
    python tiny_world.py render --out runs/world --n 200 --seed 0  # the tiny world, once (the default --data)
    python gdso.py                                            # tiny world, from assets/tiny_base.safetensors
    python gdso.py --method grpo --out runs/grpo.safetensors  # the GRPO baseline
    torchrun --nproc_per_node=8 gdso.py --model Qwen/Qwen3.5-27B --data my_pairs --bf16 --fsdp \\
        --checkpointing --pairs 64 --group 8 --max-new-tokens 1024 --lr 1e-6 --micro-pairs 1
        # on 80 GB cards add: --micro-samples 2 --offload
"""

import argparse
from dataclasses import dataclass

import torch

import common
from data import S_MAX, S_MIN, format_table, make_pairs, score_to_level
from eval import evaluate_sharded
from zr_kernels import gap_l1, score_ce

SCORE_RANGE = S_MAX - S_MIN  # R of Eqs. 7, 10 and 11


# -----------------------------------------------------------------------------
# the GDSO terms (pure functions of tensors; tests check them against hand-computed values)


def pointwise_reward(mu, s):
    """Eq. 7: r_pt[p, i] = 1 - |mu[p, i] - s[p]| / R for mu (P, G), s (P,)."""
    return 1 - (mu - s[:, None]).abs() / SCORE_RANGE


def valid_gaps(mu_w, mu_l, s_w, s_l, valid_w, valid_l):
    """Eqs. 10-11 over the valid traces only: (L_pw, r_pw_w, r_pw_l), rewards detached.

    mu (P, G), s (P,), valid (P, G) bool. A malformed trace has no score token; its mu (read at the
    trace's end) is no score at all, so it must not enter its partners' rewards or the gap loss:
    each sum over partners runs over the valid ones and is divided by their count, and L_pw[p] is
    the mean over valid cross pairs (0 for a pair with none). All valid: exactly gap_l1.
    """
    if bool(valid_w.all()) and bool(valid_l.all()):
        return gap_l1(mu_w, mu_l, s_w, s_l, SCORE_RANGE)  # the fused kernel (Triton on GPU)
    mw, ml = mu_w.float(), mu_l.float()
    m = (valid_w[:, :, None] & valid_l[:, None, :]).float()  # (P, G, G) pairs of valid traces
    delta = (s_w.float() - s_l.float())[:, None, None]
    a = (mw[:, :, None] - ml[:, None, :] - delta).abs() * m  # A[p, i, k], zero where either is malformed
    n_l, n_w = valid_l.float().sum(-1)[:, None], valid_w.float().sum(-1)[:, None]  # (P, 1) valid partners
    r_w = 1 - a.sum(2).detach() / (n_l.clamp_min(1) * SCORE_RANGE)  # Eq. 10, winners: mean over valid losers
    r_l = 1 - a.sum(1).detach() / (n_w.clamp_min(1) * SCORE_RANGE)  # Eq. 10, losers: mean over valid winners
    loss = (a.sum((1, 2)) / (m.sum((1, 2)).clamp_min(1) * SCORE_RANGE)).mean()  # Eq. 11 per pair, then over pairs
    return loss, r_w, r_l


def gdso_rewards(mu_w, mu_l, s_w, s_l, valid_w, valid_l, lambda_pt=1.0, lambda_pw=1.0):
    """Eq. 13 for both sides: (r_w, r_l), each (P, G), detached; invalid traces get the minimum.

    r_pt lies in [0, 1] and r_pw in [-1, 1], so the minimum of r is -lambda_pw. r_pw of a valid
    trace compares it with its valid partners only (valid_gaps).
    """
    mu_w, mu_l = mu_w.detach().float(), mu_l.detach().float()
    _, rpw_w, rpw_l = valid_gaps(mu_w, mu_l, s_w.float(), s_l.float(), valid_w, valid_l)
    r_w = lambda_pt * pointwise_reward(mu_w, s_w.float()) + lambda_pw * rpw_w
    r_l = lambda_pt * pointwise_reward(mu_l, s_l.float()) + lambda_pw * rpw_l
    floor = -lambda_pw
    return torch.where(valid_w, r_w, floor), torch.where(valid_l, r_l, floor)


def group_advantages(r, eps=1e-4):
    """Eq. 3 per group (row) of G samples: (r - mean) / (std + eps); zero when G = 1 or all tie."""
    if r.shape[-1] == 1:
        return torch.zeros_like(r)
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)


def policy_loss(logp, logp_old, adv, mask, clip_eps=0.2, logp_ref=None, beta=0.0):
    """Clipped-ratio surrogate of Eq. 4 plus beta * KL(pi || pi_ref), per trace then averaged.

    logp, logp_old, logp_ref: (N, L) token log-probs; adv: (N,); mask: (N, L) completion tokens.
    Returns (loss, stats): token means within each trace, then the mean over traces; stats holds
    what a PPO run is watched by, detached: kl (to pi_ref), kl_old (k3 estimate of KL(pi_old || pi),
    how far this inner step has moved from the sampling policy) and clip (the fraction of tokens
    whose ratio is clipped, i.e. carries no gradient).
    """
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    unclipped, clipped = ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None]
    surrogate = torch.minimum(unclipped, clipped)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if logp_ref is not None and beta > 0:
        # k3 estimator of KL(pi || pi_ref): exp(ref - pi) - (ref - pi) - 1 >= 0, unbiased under pi
        d = logp_ref - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    n = mask.sum(-1).clamp_min(1)
    mean = lambda x: ((x.detach().float() * mask).sum(-1) / n).mean()  # per trace, then over traces
    loss = ((per_token * mask).sum(-1) / n).mean()
    stats = {"kl": mean(kl), "kl_old": mean(ratio - 1 - log_ratio), "clip": mean(clipped < unclipped)}
    return loss, stats


def direct_losses(score_logits, mu, labels, valid, P, G, valid_per_micro=None, label_logprob=None):
    """L_pt (Eq. 8) and L_pw (Eq. 11) for 2 P G samples laid out as (side, pair, sample).

    score_logits (2PG, K), mu (2PG,), labels (2,P) = (s_w, s_l), valid (2PG,) bool. Invalid traces
    are left out of L_pt and of L_pw (their mu is read at the trace's end: no score). L_pt is the
    CE summed over valid samples divided by valid_per_micro (default: the valid samples here).
    Training passes the step's valid traces over all ranks divided by (ranks x micro-batches):
    it averages the micro-batches' losses and DDP / FSDP average the ranks' gradients, so the
    update is that of the CE summed over the step's valid traces / their count, however split.
    label_logprob: (2PG,) log p(label's bin token) against the whole vocabulary at the score
    position; when given, L_pt is its negative mean (see the module docstring, point 4).
    """
    divisor = valid_per_micro if valid_per_micro is not None else valid.sum().clamp_min(1)
    l_pt = pointwise_ce(score_logits, label_levels(labels, G), valid, divisor, label_logprob)
    return l_pt, gap_loss(mu, labels, valid, P, G)


def label_levels(labels, G):
    """(2, P) labels -> (2PG,) the 0-based bin of each sample's label, in (side, pair, sample) order."""
    target = torch.tensor([score_to_level(float(s)) - 1 for s in labels.flatten()], device=labels.device)
    return target.view(2, -1, 1).expand(-1, -1, G).flatten()


def pointwise_ce(score_logits, target, valid, divisor, label_logprob=None):
    """Eq. 8 summed over the valid samples, / divisor: a sum over samples, so that a chunk of them
    (--micro-samples) adds its share with the same divisor. target (n,): each sample's label bin;
    label_logprob (n,): as in direct_losses."""
    target = torch.where(valid, target, torch.full_like(target, -100))
    ce = score_ce(score_logits, target) if label_logprob is None else -torch.where(valid, label_logprob, 0.0)
    return ce.sum() / divisor


def gap_loss(mu, labels, valid, P, G):
    """Eq. 11 for 2PG samples' mu (2PG,): every winner against every loser of its pair, so it is not
    a sum over samples (see gap_gradient); invalid samples left out (valid_gaps)."""
    v = valid.view(2, P, G)
    mu = torch.where(valid, mu, mu.detach()).view(2, P, G)
    l_pw, _, _ = valid_gaps(mu[0], mu[1], labels[0], labels[1], v[0], v[1])
    return l_pw


# -----------------------------------------------------------------------------
# one step of Algorithm 1: sample rollouts from pi_old, score them, reward them, update K_gdso times


@dataclass
class Rollouts:
    """The rollouts of one forward: G sampled traces for each side of a few pairs, and what training reads of them.

    Every per-trace tensor has N = 2 x pairs x G rows in (side, pair, sample) order, side 0 the
    winner: by_side(x) is its (2, pairs, G) view, the layout of Eqs. 3, 10, 11 and 13. A step's
    rollouts are a list of these, one per micro-batch of whole pairs (each forward pads its own
    traces, so the token tensors of two micro-batches differ in length). sample() fills the
    fields up to label_tokens, score() the pi_old and pi_ref ones, reward() the last two.
    """

    pairs: list  # (winner record, loser record) each
    G: int
    traces: list  # the N sampled completions, token ids
    batch: dict  # prompt + trace, encoded for teacher forcing
    targets: torch.Tensor  # (N, L) each trace token at the position that predicts it, -100 elsewhere
    mask: torch.Tensor  # (N, L) targets != -100: the tokens the policy loss averages over
    score_index: torch.Tensor  # (N,) the position whose hidden state predicts the score token
    valid: torch.Tensor  # (N,) bool: the trace wrote "Score: N" within the length budget
    labels: torch.Tensor  # (2, pairs): s_w, s_l
    label_tokens: torch.Tensor  # (N,) the token of the label's bin (the full-vocabulary L_pt)
    old_logp: torch.Tensor = None  # (N, L) log pi_old(o_t | o_<t), at the sampling temperature
    old_score_logits: torch.Tensor = None  # (N, K) pi_old's score logits: the mu of the rewards
    ref_logp: torch.Tensor = None  # (N, L) log pi_ref(o_t | o_<t); None when beta = 0
    rewards: torch.Tensor = None  # (2, pairs, G): Eq. 13
    advantages: torch.Tensor = None  # (N,): Eq. 3

    def by_side(self, x):
        """(N,) in (side, pair, sample) order -> (2, pairs, G)."""
        return x.view(2, len(self.pairs), self.G)


def encode(model, queries, images, traces=None):
    """The reasoning-mode prompts of `queries` (records), with their traces appended when given."""
    return model.encode([q["prompt"] for q in queries], [images[q["image_path"]] for q in queries],
                        [q["dimension"] for q in queries], "reasoning", completions=traces)


def sample(policy, pairs, micro_pairs, args, step, rank, device):
    """Algorithm 1's sampling: G traces per side of each of this rank's pairs from pi_old (the
    current policy) -> [Rollouts], one per micro-batch of `micro_pairs` whole pairs.

    Generation runs in eval mode with the KV cache (common.rollout_mode: the whole policy gathered
    and no collectives inside, or with --layerwise-rollout one unit at a time). Each micro-batch
    samples under the seed (--seed, step, its index in the global batch), so the traces do not
    depend on how the batch is split over ranks.
    """
    G = args.group
    chunks = [pairs[a:a + micro_pairs] for a in range(0, len(pairs), micro_pairs)]
    queries = [[pair[side] for side in (0, 1) for pair in chunk for _ in range(G)] for chunk in chunks]
    records = {q["image_path"]: q for qs in queries for q in qs}  # each image once, for its G rollouts
    images = dict(zip(records, common.open_images(list(records.values()))))
    traces = []
    with common.rollout_mode(policy, layerwise=args.layerwise_rollout) as m:
        for i, qs in enumerate(queries):
            with common.seeded(device, args.seed, step, rank * len(chunks) + i):
                traces.append(m.generate(encode(m, qs, images), args.max_new_tokens, args.temperature))
    return [teacher_forcing(common.unwrap(policy), chunk, qs, tr, images, G, device)
            for chunk, qs, tr in zip(chunks, queries, traces)]


def teacher_forcing(model, pairs, queries, traces, images, G, device):
    """The Rollouts of one micro-batch's sampled traces: prompt + trace encoded, the positions that
    predict the trace's tokens and its score token, which traces are valid, the labels."""
    batch = encode(model, queries, images, traces)
    targets = model.completion_targets(batch, traces)
    # a malformed trace is read at its end: its reward is the minimum and it gets no direct loss either way
    score_index, valid = model.score_positions(batch, traces)
    labels = torch.tensor([[w["score"] for w, _ in pairs], [l["score"] for _, l in pairs]], device=device)
    return Rollouts(pairs, G, traces, batch, targets, mask=targets != -100,
                    score_index=score_index, valid=valid, labels=labels,
                    label_tokens=model.bin_ids[label_levels(labels, G)])


def row_chunks(n, size):
    """The chunks of --micro-samples `size` over a micro-batch's n samples, as slices: [slice(None)]
    (the whole micro-batch, one forward) when size is 0 or at least n; else the last may be shorter."""
    if not size or size >= n:
        return [slice(None)]
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def batch_rows(batch, rows):
    """Rows `rows` (a slice) of a batch from model.encode, as the model reads them.

    Every per-sequence tensor is sliced by row; pixel_values holds all the images' patches in row
    order (one image per sequence, t x h x w patch rows each by image_grid_thw), so it is sliced
    by cumulative patch counts. prompt_len is kept: the rows keep the batch's left padding, so
    score_index and targets still point at the same tokens (re-encoding would pad them anew).
    """
    if rows == slice(None):
        return batch
    n, grid = batch["input_ids"].shape[0], batch["image_grid_thw"]
    assert grid.shape[0] == n, "one image per sequence (model.encode)"
    a, b, _ = rows.indices(n)
    ends = [0, *grid.prod(-1).cumsum(0).tolist()]
    out = {}
    for name, v in batch.items():
        if name == "pixel_values":
            out[name] = v[ends[a]:ends[b]]
        elif torch.is_tensor(v):
            assert v.shape[0] == n, f"batch[{name!r}] is not one row per sequence: slice it here"
            out[name] = v[rows]
        else:
            out[name] = v
    return out


@torch.no_grad()
def score(policy, ref, rollouts, T, micro_samples=0):
    """pi_old's token log-probs and score logits, and pi_ref's token log-probs, before any update.

    In eval mode, as the traces were sampled (common.rollout_mode): pi_old is the policy they come
    from. The updates run in train mode; with no active dropout (Qwen3.5's attention_dropout is
    0.0, the tiny model has none) that is the same function, and the forwards go in the same
    chunks of --micro-samples, so inner step 0's ratio pi_theta / pi_old is exactly 1. At the
    sampling temperature T, the policy the traces come from.
    """
    policy.eval()
    for r in rollouts:
        outs = [policy(batch_rows(r.batch, rows), r.score_index[rows], targets=r.targets[rows], temperature=T)
                for rows in row_chunks(len(r.traces), micro_samples)]
        r.old_logp = torch.cat([o["token_logprobs"] for o in outs])
        r.old_score_logits = torch.cat([o["score_logits"] for o in outs])
    if ref is not None:
        for r in rollouts:
            r.ref_logp = torch.cat([ref(batch_rows(r.batch, rows), r.score_index[rows], targets=r.targets[rows],
                                        temperature=T)["token_logprobs"]
                                    for rows in row_chunks(len(r.traces), micro_samples)])
        common.reshard(ref)  # FSDP2 would keep its root (embeddings, LM head) gathered until the next step


def reward(rollouts, model, args):
    """Eq. 13's rewards of every trace from pi_old's mu (--reward-from parsed: the score its text
    states), then Eq. 3's advantages over the G samples of each side of each pair. Both are per
    pair, so computing them micro-batch by micro-batch gives the batch's."""
    for r in rollouts:
        if args.reward_from == "parsed":
            mu = torch.tensor([model.parsed_score(t) or S_MIN for t in r.traces], device=r.valid.device)
        else:
            mu = model.distribution(r.old_score_logits).mean
        mu, valid = r.by_side(mu), r.by_side(r.valid)
        r_w, r_l = gdso_rewards(mu[0], mu[1], r.labels[0], r.labels[1], valid[0], valid[1],
                                args.lambda_pt, args.lambda_pw)
        r.rewards = torch.stack([r_w, r_l])
        r.advantages = group_advantages(r.rewards, args.adv_eps).flatten()


def gdso_loss(policy, r, args, T, valid_per_micro, rows=slice(None), g_mu=None):
    """Eq. 14 on one micro-batch -> (loss, its terms): the clipped surrogate plus beta KL to pi_ref
    (Eq. 4), plus alpha_pt L_pt (Eq. 8) and alpha_pw L_pw (Eq. 11) through pi_theta's score
    distribution at the sampled traces' score tokens.

    rows (a slice of its N samples, --micro-samples): that chunk's share, so that the shares of a
    micro-batch's chunks sum to its loss. The policy loss is a mean over traces: the chunk's mean
    weighs |rows| / N (its stats too). L_pt is a sum over traces / valid_per_micro already. L_pw
    couples all of a pair's samples through mu: it enters as alpha_pw (g_mu[rows] * mu).sum(), with
    g_mu = dL_pw / dmu from gap_gradient, which has L_pw's gradient but not its value; the terms
    then carry the chunk's detached mu instead, from which update logs L_pw.
    """
    whole = rows == slice(None)
    share = len(range(len(r.traces))[rows]) / len(r.traces)  # |rows| / N
    full_vocab_ce = args.alpha_pt and args.full_vocab_ce
    out = policy(batch_rows(r.batch, rows), r.score_index[rows], targets=r.targets[rows], temperature=T,
                 score_targets=r.label_tokens[rows] if full_vocab_ce else None)
    pg, stats = policy_loss(out["token_logprobs"], r.old_logp[rows], r.advantages[rows], r.mask[rows], args.clip_eps,
                            None if r.ref_logp is None else r.ref_logp[rows], args.beta)
    pg, stats = pg * share, {name: v * share for name, v in stats.items()}
    loss = pg
    l_pt = l_pw = torch.zeros((), device=r.valid.device)
    terms = {}
    if args.alpha_pt or args.alpha_pw:
        mu = common.unwrap(policy).distribution(out["score_logits"]).mean
        if whole:
            l_pt, l_pw = direct_losses(out["score_logits"], mu, r.labels, r.valid, len(r.pairs), r.G, valid_per_micro,
                                       out.get("score_target_logprob"))
            loss = loss + args.alpha_pt * l_pt + args.alpha_pw * l_pw
        else:
            divisor = valid_per_micro if valid_per_micro is not None else r.valid.sum().clamp_min(1)
            l_pt = pointwise_ce(out["score_logits"], label_levels(r.labels, r.G)[rows], r.valid[rows], divisor,
                                out.get("score_target_logprob"))
            loss = loss + args.alpha_pt * l_pt
            if g_mu is not None:
                loss = loss + args.alpha_pw * (g_mu[rows] * mu).sum()
            terms["mu"] = mu.detach()
    return loss, {"pg": pg, "l_pt": l_pt, "l_pw": l_pw, **stats, **terms}


def gap_gradient(policy, r, chunks):
    """The first pass of a micro-batch in chunks (--micro-samples) when alpha_pw > 0: L_pw (Eq. 11)
    compares every winner with every loser of a pair, so it is no sum over chunks. A no-grad
    forward of each chunk gives pi_theta's mu of all N samples -> dL_pw / dmu (N,) at it, detached;
    each chunk's forward with grad then adds (g_mu[chunk] * mu_chunk).sum(), whose gradient is
    L_pw's (the chain rule through mu). The cost: one extra no-grad forward of the micro-batch."""
    with torch.no_grad():
        logits = torch.cat([policy(batch_rows(r.batch, rows), r.score_index[rows])["score_logits"] for rows in chunks])
    mu = common.unwrap(policy).distribution(logits).mean.requires_grad_()
    with torch.enable_grad():
        g_mu, = torch.autograd.grad(gap_loss(mu, r.labels, r.valid, len(r.pairs), r.G), mu)
    return g_mu


def update(policy, optimizer, rollouts, args, step, k, valid_per_micro, T):
    """Inner step k of K_gdso on the step's rollouts: Eq. 14 over its micro-batches, one optimizer
    step -> this update's logs (each loss term's mean over the micro-batches, grad norm, lr).

    --micro-samples S: each micro-batch's forward and backward go in chunks of S samples (its
    activations held for S sequences, not N), each chunk's share of the loss (gdso_loss) backed
    through at once; the gradient is the unchunked one up to summation order. With alpha_pw > 0
    a no-grad forward of the micro-batch comes first (gap_gradient)."""
    lr = common.lr_at(step * args.inner_steps + k, args.steps * args.inner_steps, args.lr, args.warmup)
    common.set_lr(optimizer, lr)
    policy.train()  # score() ran in eval mode; transformers recomputes (--checkpointing) only in train mode
    M = len(rollouts)
    sums = dict.fromkeys(("pg", "kl", "kl_old", "clip", "l_pt", "l_pw"), 0.0)
    for i, r in enumerate(rollouts):
        chunks = row_chunks(len(r.traces), args.micro_samples)
        g_mu = gap_gradient(policy, r, chunks) if len(chunks) > 1 and args.alpha_pw else None
        mus = []
        for j, rows in enumerate(chunks):
            # reduced across ranks once, on the last chunk of the last micro-batch
            with common.grad_sync(policy, i == M - 1 and j == len(chunks) - 1):
                loss, terms = gdso_loss(policy, r, args, T, valid_per_micro, rows, g_mu)
                # every micro-batch holds as many pairs: the mean of their losses is the batch's loss
                (loss / M).backward()
            if "mu" in terms:
                mus.append(terms.pop("mu"))
            for name, val in terms.items():
                sums[name] += float(val.detach()) / M
        if mus:  # in chunks, L_pw's value from the chunks' mu together
            sums["l_pw"] += float(gap_loss(torch.cat(mus), r.labels, r.valid, len(r.pairs), r.G)) / M
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.clip)
    common.check_finite_step(step, grad_norm, sums["pg"])  # stop, before a NaN update
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(sums, grad_norm=float(grad_norm), lr=lr)


def print_step(step, rollouts, inner_logs, timer, world, device):
    """The step's line, averaged over ranks: the rollouts' reward (and its std within a group),
    valid fraction and length, then each update's terms, one value per inner step joined by "/"."""
    rewards = torch.cat([r.rewards for r in rollouts], 1)  # (2, P, G)
    G = rewards.shape[-1]
    lengths = torch.tensor([float(len(t)) for r in rollouts for t in r.traces])
    logs = {f"{name}.{k}": value for k, d in enumerate(inner_logs) for name, value in d.items()}
    logs.update(reward=float(rewards.mean()), reward_std=float(rewards.view(-1, G).std(-1).mean()) if G > 1 else 0.0,
                valid=float(torch.cat([r.valid for r in rollouts]).float().mean()), length=float(lengths.mean()))
    logs = common.all_mean(logs)
    ms = timer.lap()
    per_k = lambda name, fmt: "/".join(format(logs[f"{name}.{k}"], fmt) for k in range(len(inner_logs)))
    common.print0(f"step {step:4d} | reward {logs['reward']:.3f} (std {logs['reward_std']:.3f}) | "
                  f"valid {logs['valid']:.2f} | len {logs['length']:.1f} | pg {per_k('pg', '+.4f')} | "
                  f"kl {per_k('kl', '.4f')} | l_pt {per_k('l_pt', '.3f')} | l_pw {per_k('l_pw', '.4f')} | "
                  f"grad {per_k('grad_norm', '.2f')} | clip {per_k('clip', '.3f')} | kl_old {per_k('kl_old', '.2e')} | "
                  f"lr {per_k('lr', '.1e')} | {ms:.0f} ms | {len(lengths) * world / ms * 1000:.1f} samples/s"
                  f"{common.peak_memory(device)}")


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="GDSO teacher training (and the GRPO / parsed-reward baselines)")
    p.add_argument("--init", default=common.asset("tiny_base.safetensors"),
                   help="start from this score-model .safetensors (the tiny base by default)")
    p.add_argument("--model", default="",
                   help="instead of --init: an HF folder / hub id (e.g. Qwen/Qwen3.5-27B), or 'tiny'")
    common.add_run_flags(p, {"--data": "runs/world", "--out": "runs/gdso.safetensors", "--steps": 60,
                         "--lr": 5e-05, "--warmup": 10, "--weight-decay": 0.0, "--clip": 1.0, "--eval-every": 20,
                         "--eval-limit": 512, "--save-every": 20, "--resume": False, "--stop-after": 0,
                         "--seed": 0, "--bf16": False, "--fsdp": False, "--checkpointing": False},
                         notes={
                             "--data": "train.jsonl and test.jsonl",
                             "--steps": "N outer iterations x M steps",
                             "--lr": "the tiny world's; docs/LOG.md",
                             "--warmup": "in optimizer updates",
                             "--resume": "pi_ref too",
                             "--seed": "data order and sampling",
                             "--bf16": "pi_ref: bf16 weights",
                         })
    p.add_argument("--method", default="gdso", choices=["gdso", "grpo"],
                   help="grpo = expectation reward only, alphas forced to 0")
    p.add_argument("--reward-from", default="expectation", choices=["expectation", "parsed"],
                   help="reward from mu, or from the score written in the trace (ablation)")
    p.add_argument("--ref-reset-every", type=common.positive_int, default=20,
                   help="M: steps per outer iteration; pi_ref <- pi_theta at each start")
    p.add_argument("--pairs", type=common.positive_int, default=8, help="pairs per step (global)")
    p.add_argument("--group", type=common.int_at_least(2, "the advantages of Eq. 3 compare each sample with its "
                                                          "group's mean: with G = 1 every advantage is 0"),
                   default=4, help="G: samples per side")
    p.add_argument("--inner-steps", type=common.positive_int, default=2,
                   help="K_gdso: gradient steps per sampled batch")
    p.add_argument("--micro-pairs", type=common.positive_int, default=8,
                   help="pairs per forward per rank (gradient accumulation over the rest)")
    p.add_argument("--clip-eps", type=common.positive_float, default=0.2, help="PPO ratio clip")
    p.add_argument("--beta", type=common.nonnegative_float, default=0.02,
                   help="KL(pi || pi_ref) weight; 0 skips the reference model")
    p.add_argument("--adv-eps", type=common.positive_float, default=1e-4, help="eps in the advantage denominator")
    p.add_argument("--lambda-pt", type=common.nonnegative_float, default=1.0,
                   help="weight of the pointwise reward (Eq. 13)")
    p.add_argument("--lambda-pw", type=common.nonnegative_float, default=1.0,
                   help="weight of the pairwise reward (Eq. 13)")
    p.add_argument("--alpha-pt", type=common.nonnegative_float, default=0.5,
                   help="weight of the direct CE loss L_pt (Eq. 14)")
    p.add_argument("--alpha-pw", type=common.nonnegative_float, default=1.0,
                   help="weight of the direct gap loss L_pw (Eq. 14)")
    p.add_argument("--full-vocab-ce", action=argparse.BooleanOptionalAction, default=True,
                   help="L_pt as -log p(label bin token) over the whole vocabulary (default) instead of over the K "
                        "bins only")
    p.add_argument("--temperature", type=common.nonnegative_float, default=1.0,
                   help="rollout sampling temperature (0 = greedy)")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=64,
                   help="trace length budget; no score token by then = malformed")
    common.add_freeze_flags(p, whose="the policy")
    p.add_argument("--micro-samples", type=common.nonnegative_int, default=0,
                   help="S: forward and backward each micro-batch's 2 x micro-pairs x G samples in chunks of S "
                        "(activations for S sequences), same gradient; 0 = all at once. With --alpha-pw > 0, "
                        "one extra no-grad forward per micro-batch and update (L_pw couples all samples)")
    p.add_argument("--offload", action="store_true",
                   help="AdamW's state waits in host memory (pinned) except during the updates, pi_ref except while "
                        "it scores; bit-identical results, two host<->GPU copies of each per step (memory_plan.py)")
    p.add_argument("--layerwise-rollout", action="store_true",
                   help="with --fsdp: sample and evaluate with one decoder unit gathered at a time instead of the "
                        "whole policy (same tokens; an all-gather of the model per generated token)")
    args = p.parse_args(argv)  # every value is checked by its type (common.RUN_FLAGS, the ones above)
    if args.layerwise_rollout and not args.fsdp:
        p.error("--layerwise-rollout needs --fsdp: without it every rank holds the whole policy anyway")
    if args.method == "grpo":
        args.alpha_pt = args.alpha_pw = 0.0
    return args


def load_data(args, rank, world):
    """The data, before any model: a missing file, a bad record or too few pairs stops the run here.
    -> (train records, test records, this rank's stream of pair batches)."""

    train_file, test_file = common.data_files(args.data, "train.jsonl", "test.jsonl")
    train, test = common.load_records(train_file), common.load_records(test_file)
    common.warn_overlap(train, test, train_file, test_file)
    test = test[:args.eval_limit] if args.eval_limit else test
    pairs = make_pairs(train)
    common.check_batch(len(pairs), args.pairs, "--pairs", f"same-prompt pairs with different labels in {train_file}",
                       world)
    return train, test, common.Batches(pairs, args.pairs, rank, world, seed=args.seed)


def load_models(args, device, train, test):
    """-> (the policy: fp32 master weights under DDP / FSDP2, pi_ref: frozen, None when beta = 0, AdamW).

    Under FSDP2 both are built on the meta device and each rank reads only its shard (common.wrap).
    pi_ref is loaded once the policy is placed, so that a rank never holds two unsharded copies in
    host memory; its weights become pi_theta's at the first step (main copies them, --resume reads them).
    """
    model = common.load_model(args.model or args.init, seed=args.seed, meta=common.sharded(args.fsdp))
    common.check_resume_model(args, model, f"--model {args.model}" if args.model else f"--init {args.init}")
    common.check_context(model, train, "reasoning", args.max_new_tokens)
    common.check_context(model, test, "reasoning", args.max_new_tokens)
    common.freeze(model, args)
    policy = common.wrap(model, device, fsdp=args.fsdp, bf16=args.bf16, checkpointing=args.checkpointing)
    ref = None
    if args.beta > 0:
        dtype = torch.bfloat16 if args.bf16 else None  # frozen, pi_ref may keep bf16 weights
        ref = common.load_model(args.model or args.init, seed=args.seed, dtype=dtype, meta=common.sharded(args.fsdp))
        ref = common.wrap_frozen(ref, device, fsdp=args.fsdp, bf16=args.bf16)
    return policy, ref, common.build_optimizer(policy, args.lr, args.weight_decay)


def optimizer_tensors(optimizer):
    """The tensors of an optimizer's state (AdamW: step, exp_avg, exp_avg_sq per parameter): none before
    its first step."""
    return [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]


def save(args, policy, ref, optimizer, step, batches):
    """A checkpoint set: the policy, its train state and pi_ref (--resume restores all three)."""
    common.save_checkpoint(args.out, policy, optimizer, step, batches, args, frozen=ref, mode="reasoning",
                           stage=args.method)


def evaluate(args, policy, test, step):
    """Greedy traces on the test records, read as the deployed teacher reads them; NAME.eval.json."""
    table, _ = evaluate_sharded(policy, test, "reasoning", max_new_tokens=args.max_new_tokens,
                                layerwise=args.layerwise_rollout)
    common.print0(format_table(table, f"step {step} | test (reasoning mode, greedy)"))
    method = args.method + ("-parsed" if args.reward_from == "parsed" else "")
    common.write_json(args.out, "eval", {"step": step, "method": method, "table": table})


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.dist_init()
    common.check_resume(args)  # before any model loads: what --resume continues, and with which flags
    common.seed_all(args.seed + rank)
    train, test, batches = load_data(args, rank, world)
    micro_pairs, _ = common.split_batch(args.pairs, args.micro_pairs, world, "--pairs", "--micro-pairs")
    policy, ref, optimizer = load_models(args, device, train, test)
    step = common.resume_step(args, policy, optimizer, batches, frozen=ref)
    K = args.inner_steps
    common.print0(f"{args.method} (reward from {args.reward_from}) | {len(batches.items)} train pairs | "
                  f"{args.pairs // world} pairs x 2 sides x G={args.group} per rank x {world} ranks | K={K} | "
                  f"beta={args.beta} | alpha_pt={args.alpha_pt} alpha_pw={args.alpha_pw}")
    common.print0(f"each step: the rollouts' reward, valid fraction and length, then pg kl l_pt l_pw grad clip kl_old "
                  f"lr of each update, inner steps k = 0..{K - 1} joined by '/'")
    # every log-prob recomputed for the ratio and the KL (pi_old, pi_theta, pi_ref) is at the
    # sampling temperature: the traces come from softmax(logits / T)
    T = args.temperature if args.temperature > 0 else 1.0
    # --offload: each phase keeps on the device only the state it uses (AdamW's moments, pi_ref)
    offload = common.Offload(device, enabled=args.offload, adam=lambda: optimizer_tensors(optimizer),
                             ref=lambda: [*ref.parameters(), *ref.buffers()] if ref is not None else [])
    timer = common.Timer()
    while step < args.steps:
        if ref is not None and step % args.ref_reset_every == 0:
            offload.keep("ref")
            common.copy_params(ref, policy)  # pi_ref <- pi_theta at the start of each outer iteration
        offload.keep()
        rollouts = sample(policy, batches.next(), micro_pairs, args, step, rank, device)  # G o_{j,i} ~ pi_old
        offload.keep("ref")
        score(policy, ref, rollouts, T, args.micro_samples)  # log pi_old and q_old of every trace, log pi_ref
        offload.keep("adam")
        reward(rollouts, common.unwrap(policy), args)  # r: Eqs. 7, 10, 13; A: Eq. 3
        # L_pt's divisor (direct_losses): the step's valid traces on all ranks, per (rank, micro-batch)
        n_valid = max(common.all_sum(sum(float(r.valid.sum()) for r in rollouts)), 1.0)
        valid_per_micro = n_valid / (world * len(rollouts))
        # K_gdso gradient steps of Eq. 14 on the same rollouts
        inner_logs = [update(policy, optimizer, rollouts, args, step, k, valid_per_micro, T) for k in range(K)]
        step += 1
        print_step(step, rollouts, inner_logs, timer, world, device)
        do_save, stop, do_eval = common.after_step(step, args)
        if do_save:
            offload.keep("adam", "ref")
            save(args, policy, ref, optimizer, step, batches)
        if stop:
            break
        if do_eval:
            offload.keep()
            evaluate(args, policy, test, step)
    common.dist_cleanup()


if __name__ == "__main__":
    main()
    common.exit_worker()
