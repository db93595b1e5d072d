"""
GDSO: Group-wise Direct Score Optimization of the reasoning teacher (Z-Reward, Sec. 3, Algorithm 1).

One training item is a same-prompt, same-dimension pair (p, I_w, I_l, s_w, s_l, d) with s_w > s_l.
For each side j the policy samples G outputs o_{j,i} = (reasoning trace, "Score: N"); the score
distribution q_{j,i} at the score token gives mu_{j,i}. Then, with R = S_max - S_min:

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
   that T. The log shows, per inner step, the clipped fraction, the k3 KL to pi_old and the lr.
4. Direct losses, differentiable through the score-token logits given the sampled trace:
   alpha_pt * L_pt, the CE of the label's bin (Eq. 8), and alpha_pw * L_pw, the L1 loss on the
   score gap over all G x G cross pairs (Eq. 11). Total (Eq. 14): L_GRPO + alpha_pt L_pt + alpha_pw L_pw.
   Changed: L_pt is -log p(label's bin token) against the whole vocabulary at the score position,
   i.e. -log q(s) - log P(the score token is a bin). The second term is ~0 while the format holds;
   without it (--no-full-vocab-ce, Eq. 8 over the K bins only) the CE is blind to the mass the
   score position gives to non-bin tokens, Adam lets that mass drift, and in the tiny world the
   traces stopped reaching a score token within ~20 steps (valid fraction 1.0 -> 0.3).
5. Baselines from the same script: --method grpo (expectation reward, alphas = 0), and
   --reward-from parsed, the ablation that rewards the score written in the trace instead of mu.

Hyperparameters are not published; the defaults are what worked in the tiny world (see README).
Labels off the half-point grid (aggregates of annotations) use their nearest bin for L_pt and
their exact value for the rewards and L_pw.

Launch:
    python world.py render --out runs/world --n 200 --seed 0  # the tiny world, once (the default --data)
    python gdso.py                                            # tiny world, from assets/tiny_base.safetensors
    python gdso.py --method grpo --out runs/grpo.safetensors  # the GRPO baseline
    torchrun --nproc_per_node=8 gdso.py --model Qwen/Qwen3.5-27B --data my_pairs --bf16 --fsdp \\
        --checkpointing --pairs 64 --group 8 --max-new-tokens 1024 --lr 1e-6 --micro-pairs 1
"""

import argparse

import torch

import common
from data import S_MAX, S_MIN, score_to_level
from kernels import gap_l1, score_ce

R = S_MAX - S_MIN


# -----------------------------------------------------------------------------
# the GDSO terms (pure functions of tensors; tests check them against hand-computed values)


def pointwise_reward(mu, s):
    """Eq. 7: r_pt[p, i] = 1 - |mu[p, i] - s[p]| / R for mu (P, G), s (P,)."""
    return 1 - (mu - s[:, None]).abs() / R


def valid_gaps(mu_w, mu_l, s_w, s_l, valid_w, valid_l):
    """Eqs. 10-11 over the valid traces only: (L_pw, r_pw_w, r_pw_l), rewards detached.

    mu (P, G), s (P,), valid (P, G) bool. A malformed trace has no score token; its mu (read at the
    trace's end) is no score at all, so it must not enter its partners' rewards or the gap loss:
    each sum over partners runs over the valid ones and is divided by their count, and L_pw[p] is
    the mean over valid cross pairs (0 for a pair with none). All valid: exactly gap_l1.
    """
    if bool(valid_w.all()) and bool(valid_l.all()):
        return gap_l1(mu_w, mu_l, s_w, s_l, R)  # the fused kernel (Triton on GPU)
    mw, ml = mu_w.float(), mu_l.float()
    m = (valid_w[:, :, None] & valid_l[:, None, :]).float()  # (P, G, G) pairs of valid traces
    delta = (s_w.float() - s_l.float())[:, None, None]
    a = (mw[:, :, None] - ml[:, None, :] - delta).abs() * m  # A[p, i, k], zero where either is malformed
    n_l, n_w = valid_l.float().sum(-1)[:, None], valid_w.float().sum(-1)[:, None]  # (P, 1) valid partners
    r_w = 1 - a.sum(2).detach() / (n_l.clamp_min(1) * R)  # Eq. 10, winners: mean over valid losers
    r_l = 1 - a.sum(1).detach() / (n_w.clamp_min(1) * R)  # Eq. 10, losers: mean over valid winners
    loss = (a.sum((1, 2)) / (m.sum((1, 2)).clamp_min(1) * R)).mean()  # Eq. 11 per pair, then over pairs
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


def direct_losses(score_logits, mu, labels, valid, P, G, n_valid=None, label_logprob=None):
    """L_pt (Eq. 8) and L_pw (Eq. 11) for 2 P G samples laid out as (side, pair, sample).

    score_logits (2PG, K), mu (2PG,), labels (2,P) = (s_w, s_l), valid (2PG,) bool. Invalid traces
    are left out of L_pt and of L_pw (their mu is read at the trace's end: no score). L_pt is the
    CE summed over valid samples divided by n_valid (default: the valid samples here; training
    passes the count over all ranks and micro-batches so any split gives the same loss).
    label_logprob: (2PG,) log p(label's bin token) against the whole vocabulary at the score
    position; when given, L_pt is its negative mean (see the module docstring, point 4).
    """
    target = torch.tensor([score_to_level(float(s)) - 1 for s in labels.flatten()], device=mu.device)
    target = target.view(2, P, 1).expand(2, P, G).flatten()
    target = torch.where(valid, target, torch.full_like(target, -100))
    ce = score_ce(score_logits, target) if label_logprob is None else -torch.where(valid, label_logprob, 0.0)
    l_pt = ce.sum() / (n_valid if n_valid is not None else valid.sum().clamp_min(1))
    v = valid.view(2, P, G)
    mu = torch.where(valid, mu, mu.detach()).view(2, P, G)
    l_pw, _, _ = valid_gaps(mu[0], mu[1], labels[0], labels[1], v[0], v[1])
    return l_pt, l_pw


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="GDSO teacher training (and the GRPO / parsed-reward baselines)")
    p.add_argument("--init", default="assets/tiny_base.safetensors", help="start from this score-model .safetensors (the tiny base by default)")
    p.add_argument("--model", default="", help="instead of --init: an HF folder / hub id (e.g. Qwen/Qwen3.5-27B), or 'tiny'")
    p.add_argument("--data", default="runs/world", help="folder with train.jsonl and test.jsonl (README, Data), or world:n=200,seed=0 to render the synthetic world")
    p.add_argument("--out", default="runs/gdso.safetensors", help="checkpoint path (.safetensors; .train.pt beside it)")
    p.add_argument("--method", default="gdso", choices=["gdso", "grpo"], help="grpo = expectation reward only, alphas forced to 0")
    p.add_argument("--reward-from", default="expectation", choices=["expectation", "parsed"], help="reward from mu, or from the score written in the trace (ablation)")
    p.add_argument("--steps", type=int, default=60, help="total optimizer batches (N outer iterations x M steps)")
    p.add_argument("--ref-reset-every", type=int, default=20, help="M: steps per outer iteration; pi_ref <- pi_theta at each start")
    p.add_argument("--pairs", type=int, default=8, help="pairs per step (global)")
    p.add_argument("--group", type=int, default=4, help="G: samples per side")
    p.add_argument("--inner-steps", type=int, default=2, help="K_gdso: gradient steps per sampled batch")
    p.add_argument("--micro-pairs", type=int, default=8, help="pairs per forward per rank (gradient accumulation over the rest)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps (in optimizer updates), then cosine to 0.1x")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--beta", type=float, default=0.02, help="KL(pi || pi_ref) weight; 0 skips the reference model")
    p.add_argument("--adv-eps", type=float, default=1e-4, help="eps in the advantage denominator")
    p.add_argument("--lambda-pt", type=float, default=1.0, help="weight of the pointwise reward (Eq. 13)")
    p.add_argument("--lambda-pw", type=float, default=1.0, help="weight of the pairwise reward (Eq. 13)")
    p.add_argument("--alpha-pt", type=float, default=0.5, help="weight of the direct CE loss L_pt (Eq. 14)")
    p.add_argument("--alpha-pw", type=float, default=1.0, help="weight of the direct gap loss L_pw (Eq. 14)")
    p.add_argument("--full-vocab-ce", action=argparse.BooleanOptionalAction, default=True, help="L_pt as -log p(label bin token) over the whole vocabulary (default) instead of over the K bins only")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=64, help="trace length budget; no score token by then = malformed")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate on the test split every N steps (0 = only at the end)")
    p.add_argument("--eval-limit", type=int, default=512, help="test records per evaluation (0 = all)")
    p.add_argument("--save-every", type=int, default=20, help="write the checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --out exactly (optimizer, step, RNG, data position, pi_ref)")
    p.add_argument("--stop-after", type=int, default=0, help="stop (after saving) at this step, keeping the --steps schedule; --resume continues")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (policy: fp32 master weights and optimizer state; pi_ref: bf16 weights)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP replication")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True, help="keep the vision tower frozen (default)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1 (got {args.steps}): a run of no steps would write nothing")
    if args.method == "grpo":
        args.alpha_pt = args.alpha_pw = 0.0
    return args


def main(argv=None):
    from data import make_pairs
    from eval import format_table

    args = get_args(argv)
    rank, world, device = common.dist_init()
    common.seed_all(args.seed + rank)
    dtype = torch.bfloat16 if args.bf16 else None  # frozen pi_ref only: the policy trains on fp32 master weights
    # the data first: a missing file, a bad record or too few pairs stops the run before any model loads
    train_file, test_file = common.data_files(args.data, "train.jsonl", "test.jsonl")
    train, test = common.load_records(train_file), common.load_records(test_file)
    test = test[:args.eval_limit] if args.eval_limit else test
    pairs = make_pairs(train)
    common.check_batch(len(pairs), args.pairs, "--pairs", f"same-prompt pairs with different labels in {train_file}", world)
    batches = common.Batches(pairs, args.pairs, rank, world, seed=args.seed)
    P, G = args.pairs // world, args.group
    micro, _ = common.split_batch(args.pairs, args.micro_pairs, world, "--pairs", "--micro-pairs")
    # under FSDP2 the models are built on the meta device and each rank reads only its shard (common.wrap)
    model = common.load_model(args.model or args.init, seed=args.seed, meta=common.sharded(args.fsdp))
    common.check_context(model, train, "reasoning", args.max_new_tokens)
    common.check_context(model, test, "reasoning", args.max_new_tokens)

    if args.freeze_vision:
        model.vision_tower().requires_grad_(False)
    policy = common.wrap(model, device, fsdp=args.fsdp, bf16=args.bf16, checkpointing=args.checkpointing)
    # pi_ref: a second model, sharded / placed like the policy; none at all when beta = 0. Loaded only
    # once the policy is placed, so that a rank never holds two unsharded copies in host memory; its
    # weights are pi_theta's from the first step on (Algorithm 1 copies them in below, --resume reads them)
    ref = None
    if args.beta > 0:
        ref = common.wrap_frozen(common.load_model(args.model or args.init, seed=args.seed, dtype=dtype,
                                                   meta=common.sharded(args.fsdp)), device, fsdp=args.fsdp, bf16=args.bf16)
    optimizer = common.build_optimizer(policy, args.lr, args.weight_decay)
    step = 0
    if args.resume:
        step, _ = common.load_resume(args.out, policy, optimizer, batches)
        if ref is not None:
            common.load_frozen(ref, common.ref_path(args.out), step)  # refused unless at the set's step
        common.print0(f"resumed {args.out} at step {step}")
    inner = common.unwrap(policy)
    total_updates = args.steps * args.inner_steps
    common.print0(f"{args.method} (reward from {args.reward_from}) | {len(pairs)} train pairs | {P} pairs x 2 sides x "
                  f"G={G} per rank x {world} ranks | K={args.inner_steps} | beta={args.beta} | "
                  f"alpha_pt={args.alpha_pt} alpha_pw={args.alpha_pw}")

    n_micro = 2 * micro * G  # rollouts per forward: whole pairs, both sides
    # every recomputed log-prob (pi_old, pi_theta, pi_ref) is at the sampling temperature: the
    # traces come from softmax(logits / T), so that is the policy of the PPO ratio and the KL
    T = args.temperature if args.temperature > 0 else 1.0

    def teacher_forced(module, encs, targets, score_pos):
        """pi_T(o_t | o_<t) of every sampled token and the score logits, one forward per micro-batch."""
        outs = [module(enc, score_pos[i * n_micro:(i + 1) * n_micro], targets=t, temperature=T)
                for i, (enc, t) in enumerate(zip(encs, targets))]
        return [o["token_logprobs"] for o in outs], [o["score_logits"] for o in outs]

    timer = common.Timer()
    while step < args.steps:
        if ref is not None and step % args.ref_reset_every == 0:
            common.copy_params(ref, policy)  # Algorithm 1: pi_ref <- pi_theta at each outer iteration
        mine = batches.next()  # this rank's P pairs of (winner, loser) records
        chunks = [mine[a:a + micro] for a in range(0, P, micro)]
        # rollout layout within a micro-batch: (side, pair, sample), side 0 = winner
        queries = [pair[side] for chunk in chunks for side in (0, 1) for pair in chunk for _ in range(G)]
        images = {}
        for q in queries:
            if q["image_path"] not in images:
                images[q["image_path"]] = common.open_images([q])[0]

        def encode(qs, completions=None):
            return inner.encode([q["prompt"] for q in qs], [images[q["image_path"]] for q in qs],
                                [q["dimension"] for q in qs], "reasoning", completions=completions)

        # 1. sample G traces per side from pi_old (the current policy), KV cache, no collectives, in
        # eval mode; each micro-batch's sampling is seeded by (seed, step, its index in the global
        # batch), so the traces do not depend on how the batch is split over ranks
        completions = []
        with common.rollout_mode(policy) as m:
            for i, a in enumerate(range(0, len(queries), n_micro)):
                with common.seeded(device, args.seed, step, rank * len(chunks) + i):
                    completions += m.generate(encode(queries[a:a + n_micro]), args.max_new_tokens, args.temperature)
        encs = [encode(queries[a:a + n_micro], completions[a:a + n_micro]) for a in range(0, len(queries), n_micro)]
        targets = [inner.completion_targets(e, completions[i * n_micro:(i + 1) * n_micro]) for i, e in enumerate(encs)]
        masks = [t != -100 for t in targets]
        pos = [inner.find_score_index(c) for c in completions]
        valid = torch.tensor([p >= 0 for p in pos], device=device)
        # the hidden state one position before the score token predicts it; a malformed trace is
        # read at its end (its reward is the minimum and it gets no direct loss either way)
        score_pos = torch.tensor([encs[i // n_micro]["prompt_len"] + (p if p >= 0 else len(c)) - 1
                                  for i, (p, c) in enumerate(zip(pos, completions))], device=device)

        # 2. pi_old's token log-probs and score distributions, and pi_ref's log-probs, before any update
        # (train mode, as the updates below, so that the ratio of inner step 0 is exactly 1)
        policy.train()
        with torch.no_grad():
            old_lp, old_logits = teacher_forced(policy, encs, targets, score_pos)
            ref_lp = teacher_forced(ref, encs, targets, score_pos)[0] if ref is not None else None

        # 3. rewards (Eqs. 7, 10, 13) and advantages per side (Eq. 3), per micro-batch of pairs
        advs, labels, r_all = [], [], []
        for i, chunk in enumerate(chunks):
            c = len(chunk)
            lab = torch.tensor([[p[0]["score"] for p in chunk], [p[1]["score"] for p in chunk]], device=device)
            v = valid[i * n_micro:(i + 1) * n_micro].view(2, c, G)
            if args.reward_from == "parsed":
                cs = completions[i * n_micro:(i + 1) * n_micro]
                mu = torch.tensor([inner.parsed_score(x) or S_MIN for x in cs], device=device).view(2, c, G)
            else:
                mu = inner.distribution(old_logits[i]).mean.view(2, c, G)
            r_w, r_l = gdso_rewards(mu[0], mu[1], lab[0], lab[1], v[0], v[1], args.lambda_pt, args.lambda_pw)
            r = torch.stack([r_w, r_l])  # (2, c, G)
            advs.append(group_advantages(r, args.adv_eps).flatten())
            labels.append(lab)
            r_all.append(r)
        r_all = torch.cat([r.flatten(1) for r in r_all], 1)
        # the label's bin token per rollout, (side, pair, sample) order, for the full-vocabulary L_pt
        label_tokens = [inner.bin_ids[torch.tensor([score_to_level(float(s)) - 1 for s in lab.flatten()], device=device)]
                        .view(2, -1, 1).expand(-1, -1, G).flatten() for lab in labels]

        # 4. K_gdso updates on the same rollouts: clipped surrogate + beta KL + direct losses (Eq. 14)
        # L_pt is normalized by the valid traces of the whole step (all ranks); DDP / FSDP average
        # gradients over ranks, so the local share is scaled by world / n_valid
        n_valid = max(common.all_sum(float(valid.sum())), 1.0) / (world * len(chunks))
        inner_logs = []  # one dict per inner step: the ratio is 1 at k = 0 and moves after
        for k in range(args.inner_steps):
            update = step * args.inner_steps + k
            lr = common.lr_at(update, total_updates, args.lr, args.warmup)
            common.set_lr(optimizer, lr)
            sums = {"pg": 0.0, "kl": 0.0, "kl_old": 0.0, "clip": 0.0, "l_pt": 0.0, "l_pw": 0.0}
            for i, chunk in enumerate(chunks):
                sl = slice(i * n_micro, (i + 1) * n_micro)
                # gradients are reduced across ranks once, on the last micro-batch
                with common.grad_sync(policy, i == len(chunks) - 1):
                    out = policy(encs[i], score_pos[sl], targets=targets[i], temperature=T,
                                 score_targets=label_tokens[i] if args.alpha_pt and args.full_vocab_ce else None)
                    pg, stats = policy_loss(out["token_logprobs"], old_lp[i], advs[i], masks[i], args.clip_eps,
                                            ref_lp[i] if ref_lp is not None else None, args.beta)
                    loss = pg
                    l_pt = l_pw = torch.zeros((), device=device)
                    if args.alpha_pt or args.alpha_pw:
                        mu_new = inner.distribution(out["score_logits"]).mean
                        l_pt, l_pw = direct_losses(out["score_logits"], mu_new, labels[i], valid[sl], len(chunk), G,
                                                   n_valid, out.get("score_target_logprob"))
                        loss = loss + args.alpha_pt * l_pt + args.alpha_pw * l_pw
                    # each micro-batch holds the same number of pairs: its mean over micro-batches is the batch mean
                    (loss / len(chunks)).backward()
                for name, val in (("pg", pg), ("l_pt", l_pt), ("l_pw", l_pw), *stats.items()):
                    sums[name] += float(val.detach()) / len(chunks)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.clip)
            common.check_finite_step(step, grad_norm, sums["pg"])  # stop, before a NaN update
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            inner_logs.append(dict(sums, grad_norm=float(grad_norm), lr=lr))
        step += 1

        lengths = torch.tensor([float(len(c)) for c in completions])
        logs = {f"{name}.{k}": v for k, d in enumerate(inner_logs) for name, v in d.items()}
        logs.update(reward=float(r_all.mean()), reward_std=float(r_all.view(-1, G).std(-1).mean()) if G > 1 else 0.0,
                    valid=float(valid.float().mean()), length=float(lengths.mean()))
        logs = common.all_mean(logs)
        ms = timer.lap()
        # inner step 0's losses (ratio 1), then per inner step k: the clipped fraction, the k3 KL to
        # pi_old (how far the policy moved from the sampling one) and the lr, joined by "/"
        per_k = lambda name, fmt: "/".join(format(logs[f"{name}.{k}"], fmt) for k in range(args.inner_steps))
        common.print0(f"step {step:4d} | pg {logs['pg.0']:+.4f} | kl {logs['kl.0']:.4f} | l_pt {logs['l_pt.0']:.3f} | "
                      f"l_pw {logs['l_pw.0']:.4f} | reward {logs['reward']:.3f} (std {logs['reward_std']:.3f}) | "
                      f"valid {logs['valid']:.2f} | len {logs['length']:.1f} | clip {per_k('clip', '.3f')} | "
                      f"kl_old {per_k('kl_old', '.2e')} | lr {per_k('lr', '.1e')} | {ms:.0f} ms | "
                      f"{len(queries) * world / ms * 1000:.1f} samples/s{common.peak_memory(device)}")
        stopping = step == args.stop_after
        if step % args.save_every == 0 or step == args.steps or stopping:
            common.save_checkpoint(args.out, policy, optimizer, step, batches, args, mode="reasoning", stage=args.method)
            if ref is not None:
                common.save_frozen(ref, common.ref_path(args.out), step)
        if stopping:
            break
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            table, _ = common.evaluate_sharded(policy, test, "reasoning", max_new_tokens=args.max_new_tokens)
            common.print0(format_table(table, f"step {step} | test (reasoning mode, greedy)"))
            method = args.method + ("-parsed" if args.reward_from == "parsed" else "")
            common.write_json(args.out, "eval", {"step": step, "method": method, "table": table})
    common.dist_cleanup()


if __name__ == "__main__":
    main()
    common.exit_worker()
