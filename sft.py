"""
Supervised training of the score model, three stages.

1. --stage sft (the paper's SFT baseline): the direct score token is trained with cross-entropy on
   the human label's bin, -log q(s) (Eq. 8 without reasoning); the label is the aggregate of the
   annotations rounded to the nearest of the nine bins. No reasoning trace is read or written.
2. --stage rewarddance (the paper's RewardDance baseline, Table 2): the answer is the score token,
   then a post-hoc rationale written for the known label, then the end of the turn. The loss is
   the score token's CE exactly as in stage 1 (Eq. 8) plus --rationale-weight x the next-token
   loss of the tokens after the score token (the rationale and the end of the turn). Scoring
   reads q at the first answer token, as stage 1 does: one output token, the rationale is never
   generated. The rationale is the record's `rationale` string; a tiny-world record (one with a
   `scene`) without one uses the world's own item-by-item trace for it, without its
   "Score:" line (the paper distilled its rationales from a stronger model given the label; the
   world's trace is what such a model would write). A record with neither stops the run.
3. --stage base (the tiny world only): the language model of a tiny VLM whose vision tower was
   trained first (world.py tower) learns image captions and the templated item-by-item traces of a
   pretraining world of its own (not the labeled world the methods train on, and without its test
   prompts), with the tower frozen. The traces' score lines follow a generic rubric (every defect
   one point, world.generic_scores), not the annotators': the result reads images well and scores
   on the wrong scale, the tiny world's stand-in for a pretrained VLM before it learns a rubric
   (the paper starts from a pretrained Qwen3.5 with a system prompt instead). Zero-shot, GRPO
   and GDSO start from it; `make base` regenerates the shipped assets/tiny_base.safetensors and
   assets/tiny_student_base.safetensors.

Loss normalization: the score CE is summed over a rank's samples and divided by the step's global
number of samples; the token loss (base: the answer; rewarddance: the rationale) is summed over a
rank's tokens and divided by the step's global number of those tokens (all ranks, all
micro-batches), i.e. a per-token mean over the step, so a long rationale weighs more than a short
one. Any world size and accumulation then gives the same update as one process with the whole
batch. Both counts are known before any forward (the batch size; the tokenized answers' lengths),
so each micro-batch runs forward and backward at once and only one micro-batch's activations are
alive at a time; gradients are reduced across ranks on the last micro-batch only.

Launch:
    make base                                                                     # the tiny bases, ~50 min on a CPU
    python world.py render --out runs/world --n 200 --seed 0                      # the tiny world (the default --data)
    python sft.py --init assets/tiny_base.safetensors --out runs/sft.safetensors  # SFT baseline
    python sft.py --stage rewarddance --init assets/tiny_base.safetensors --out runs/rewarddance.safetensors
    torchrun --nproc_per_node=8 sft.py --model Qwen/Qwen3.5-27B --data my_data --bf16 --fsdp \\
        --batch-size 256 --micro-batch 4 --lr 1e-5 --out runs/sft27b.safetensors
"""

import argparse

import torch

import common
from data import SCORE_MARKER, parse_score, score_to_level
from eval import format_table
from kernels import score_ce
from model import BIN_TOKENS

parser = argparse.ArgumentParser(description="SFT baseline (direct score token), the RewardDance baseline and the tiny world's base pretraining")
parser.add_argument("--stage", default="sft", choices=["sft", "rewarddance", "base"], help="sft: direct score CE; rewarddance: score CE + post-hoc rationale loss; base: tiny-world captions + traces")
parser.add_argument("--rationale-weight", type=float, default=1.0, help="rewarddance: weight of the rationale's per-token loss beside the score CE")
parser.add_argument("--model", default="tiny", help="'tiny', an HF folder / hub id, or a score-model .safetensors")
parser.add_argument("--init", default="", help="start from this score-model .safetensors (overrides --model)")
parser.add_argument("--data", default="runs/world", help="folder with train.jsonl and test.jsonl (README, Data), or world:n=200,seed=0 to render the synthetic world")
parser.add_argument("--holdout", default="", help="a JSONL whose prompts are dropped from the training data (base stage: the labeled world's test split)")
parser.add_argument("--out", default="runs/sft.safetensors", help="checkpoint path (.safetensors; .train.pt beside it)")
parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; base stage 2400)")
parser.add_argument("--batch-size", type=int, default=32, help="global batch (samples per optimizer step)")
parser.add_argument("--micro-batch", type=int, default=32, help="samples per forward per rank (gradient accumulation fills the rest)")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; base stage, a language model from scratch: 3e-3)")
parser.add_argument("--vision-lr-mult", type=float, default=1.0, help="lr multiplier for the vision tower (with --no-freeze-vision)")
parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine to 0.1x")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
parser.add_argument("--eval-every", type=int, default=100, help="evaluate on the test split every N steps (0 = only at the end)")
parser.add_argument("--eval-limit", type=int, default=512, help="test records per periodic evaluation (0 = all)")
parser.add_argument("--save-every", type=int, default=100, help="write the checkpoint every N steps")
parser.add_argument("--resume", action="store_true", help="continue from --out (+ .train.pt) exactly")
parser.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
parser.add_argument("--bf16", action="store_true", help="bfloat16 compute (fp32 master weights and optimizer state)")
parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP replication")
parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
parser.add_argument("--direct-items", action="store_true", help="base stage: also train the one-token direct answer on the trace's own (generic-rubric) score, so that the base can score without reasoning as a pretrained VLM can")
parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True, help="keep the vision tower frozen (default; the tiny base's tower is trained in a stage of its own, world.py)")
args = parser.parse_args()
# a language model from scratch (base stage) wants a larger lr and more steps; an explicit value always wins
args.lr = args.lr if args.lr is not None else (3e-3 if args.stage == "base" else 1e-3)
args.steps = args.steps if args.steps is not None else (2400 if args.stage == "base" else 300)
if args.steps < 1:
    parser.error(f"--steps must be at least 1 (got {args.steps}): a run of no steps would write nothing")
if args.rationale_weight < 0:
    parser.error(f"--rationale-weight must be >= 0 (got {args.rationale_weight})")


def rationale_of(r):
    """The post-hoc rationale of a labeled record: its `rationale`, else (the tiny world) its trace
    without the final "Score:" line; None if it has neither."""
    if "rationale" in r:
        return r["rationale"] if isinstance(r["rationale"], str) and r["rationale"].strip() else None
    if "scene" not in r:
        return None
    from world import make_trace, parse_prompt

    trace = r.get("trace") or make_trace(r["scene"], parse_prompt(r["prompt"]), r["dimension"])
    lines = trace.split("\n")
    return "\n".join(lines[:-1] if lines[-1].startswith(SCORE_MARKER) else lines)


# -----------------------------------------------------------------------------
# init

rank, world, device = common.dist_init()
common.seed_all(args.seed + rank)
# the data first: a missing file, a bad record or a batch larger than the data stops the run before
# any model is loaded
train_file, test_file = common.data_files(args.data, "train.jsonl", "test.jsonl")
train, test = common.load_records(train_file), common.load_records(test_file)
if args.holdout:
    held = {r["prompt"] for r in common.load_records(args.holdout, labeled=False)}
    train = [r for r in train if r["prompt"] not in held]
    common.print0(f"held out {len(held)} prompts of {args.holdout}: {len(train)} training records left")
if args.eval_limit:
    test = test[:args.eval_limit]

if args.stage == "base":
    # one captioning item per image, one reasoning item per (image, dimension) with its trace
    images = {r["image_path"]: r for r in train}
    items = [("caption", r, r["caption"]) for r in images.values() if "caption" in r]
    if not all("trace" in r for r in train):
        raise SystemExit(f"{train_file} has records without a 'trace': --stage base needs the synthetic world")
    items += [("reasoning", r, r["trace"]) for r in train]
    if args.direct_items:
        # the direct answer is the trace's own score (the base's generic rubric), not the label
        items += [("direct", r, None) for r in train]
elif args.stage == "rewarddance":
    items = [("rewarddance", r, rationale_of(r)) for r in train]
    bad = next((r for _, r, text in items if text is None), None)
    if bad is not None:
        common.fail(f"{train_file}: record {bad['id']!r} has no 'rationale' (a non-empty string): --stage rewarddance "
                    f"trains on the score followed by its rationale (README, Data)")
else:
    items = [("direct", r, None) for r in train]
micro, accum = common.split_batch(args.batch_size, args.micro_batch, world)
common.check_batch(len(items), args.batch_size, "--batch-size", "training items", world)
batches = common.Batches(items, args.batch_size, rank, world, seed=args.seed)

# fp32 master weights (--bf16 is compute only); under FSDP2 built on meta, each rank reads only its shard
model = common.load_model(args.init or args.model, seed=args.seed, meta=common.sharded(args.fsdp))
if args.stage == "base" and model.source != "tiny":
    raise SystemExit("--stage base pretrains the embedded tiny model; real models start from their own pretraining")
eval_mode = {"base": "reasoning", "rewarddance": "rewarddance", "sft": "direct"}[args.stage]


def answer_ids(text, r=None):
    """The answer tokens: the caption or trace (base), or the score token then the rationale
    (rewarddance), then the end of the turn."""
    tok = model.tokenizer
    ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    if args.stage != "rewarddance":
        return ids
    # the label's bin token first (one token, model.py checks it), the rationale on the next line
    score = tok.encode(BIN_TOKENS[score_to_level(r["score"]) - 1], add_special_tokens=False)
    return score + tok.encode("\n", add_special_tokens=False) + ids


# the longest answer must fit when training; scoring reads one token (sft, rewarddance) or a trace
answer_len = max(len(answer_ids(t, r)) for _, r, t in items) if args.stage == "rewarddance" else {"sft": 1, "base": 96}[args.stage]
common.check_context(model, train, eval_mode, answer_len)
common.check_context(model, test, eval_mode, 96 if args.stage == "base" else 1)
if args.freeze_vision:
    model.vision_tower().requires_grad_(False)
ddp_model = common.wrap(model, device, fsdp=args.fsdp, bf16=args.bf16, checkpointing=args.checkpointing)
optimizer = common.build_optimizer(ddp_model, args.lr, args.weight_decay, vision_lr_mult=args.vision_lr_mult)
step = 0
if args.resume:
    step, _ = common.load_resume(args.out, ddp_model, optimizer, batches)
    common.print0(f"resumed {args.out} at step {step}")
common.print0(f"{args.stage} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {len(items)} items | "
              f"world {world} x micro {micro} x accum {accum} = {args.batch_size} | {args.steps} steps")
# the weight of the per-token loss beside the score CE: the whole loss (base), the rationale's
# (rewarddance), none (sft)
token_weight = {"sft": 0.0, "base": 1.0, "rewarddance": args.rationale_weight}[args.stage]


def micro_count(chunk):
    """What normalizes the loss, before any forward: (samples with a score CE, tokens with a
    next-token loss). rewarddance's tokens are the answer's after the score token."""
    if args.stage == "base":
        return (sum(m == "direct" for m, _, _ in chunk),
                sum(len(answer_ids(text)) for m, _, text in chunk if m != "direct"))
    if args.stage == "rewarddance":
        return len(chunk), sum(len(answer_ids(text, r)) - 1 for _, r, text in chunk)
    return len(chunk), 0


def micro_loss(chunk):
    """(score CE summed over samples, next-token loss summed over tokens) of this micro-batch."""
    inner = common.unwrap(ddp_model)
    zero = torch.zeros((), device=device)
    if args.stage in ("sft", "rewarddance"):
        recs = [r for _, r, _ in chunk]
        # rewarddance teacher-forces score + rationale; the score is read before the answer either way
        comps = [answer_ids(text, r) for _, r, text in chunk] if args.stage == "rewarddance" else None
        batch = inner.encode([r["prompt"] for r in recs], common.open_images(recs), [r["dimension"] for r in recs], eval_mode,
                             completions=comps)
        idx = torch.full((len(recs),), batch["prompt_len"] - 1, device=device)
        targets = None
        if comps is not None:
            # the rationale's tokens only: position Lp - 1 predicts the score token, whose loss is
            # the bin CE below (Eq. 8), not a second, full-vocabulary term
            targets = inner.completion_targets(batch, comps)
            targets[:, batch["prompt_len"] - 1] = -100
        out = ddp_model(batch, idx, targets=targets)
        target = torch.tensor([score_to_level(r["score"]) - 1 for r in recs], device=device)  # nearest bin
        nll = -out["token_logprobs"].sum() if targets is not None else zero
        return score_ce(out["score_logits"], target).sum(), nll
    # base: next-token loss on the answer (caption or trace + end of turn); with --direct-items
    # also the direct score token's CE on the trace's own score
    nll, ce = zero, zero
    direct = [r for m, r, _ in chunk if m == "direct"]
    if direct:
        batch = inner.encode([r["prompt"] for r in direct], common.open_images(direct), [r["dimension"] for r in direct], "direct")
        idx = torch.full((len(direct),), batch["prompt_len"] - 1, device=device)
        out = ddp_model(batch, idx)
        target = torch.tensor([parse_score(r["trace"]) - 1 for r in direct], device=device)
        ce = score_ce(out["score_logits"], target).sum()
    for mode in ("caption", "reasoning"):
        sub = [(r, text) for m, r, text in chunk if m == mode]
        if not sub:
            continue
        comps = [answer_ids(text) for _, text in sub]
        recs = [r for r, _ in sub]
        batch = inner.encode([r["prompt"] for r in recs], common.open_images(recs), [r["dimension"] for r in recs], mode,
                             completions=comps)
        targets = inner.completion_targets(batch, comps)
        idx = torch.full((len(recs),), batch["prompt_len"] - 1, device=device)
        lp = ddp_model(batch, idx, targets=targets)["token_logprobs"]
        nll = nll - lp.sum()
    return ce, nll


# -----------------------------------------------------------------------------
# the loop

timer = common.Timer()
while step < args.steps:
    lr = common.lr_at(step, args.steps, args.lr, args.warmup)
    common.set_lr(optimizer, lr)
    mine = batches.next()
    chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
    # the step's global counts (samples, tokens; all ranks and micro-batches), counted first; a
    # count of 0 has no loss term to normalize (max 1)
    counts = [micro_count(c) for c in chunks]
    n_samples = max(common.all_sum(sum(n for n, _ in counts)), 1.0)
    n_tokens = max(common.all_sum(sum(n for _, n in counts)), 1.0)
    ddp_model.train()
    ce_sum, nll_sum = 0.0, 0.0
    for i, chunk in enumerate(chunks):
        # forward and backward per micro-batch: one micro-batch's graph alive at a time; gradients
        # reduced across ranks on the last one only
        with common.grad_sync(ddp_model, i == len(chunks) - 1):
            ce, nll = micro_loss(chunk)
            # DDP / FSDP average over ranks; x world makes each term its global sum over its count
            (ce * world / n_samples + token_weight * nll * world / n_tokens).backward()
        ce_sum, nll_sum = ce_sum + float(ce.detach()), nll_sum + float(nll.detach())
    # this rank's share of the global mean losses; all_mean below sums them back over ranks
    ce_mean, nll_mean = ce_sum * world / n_samples, nll_sum * world / n_tokens
    logged = ce_mean + token_weight * nll_mean
    grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), args.clip)
    common.check_finite_step(step, grad_norm, logged)  # stop, before a NaN update
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    metrics = common.all_mean({"loss": logged, "score_ce": ce_mean, "rationale": nll_mean, "grad_norm": float(grad_norm)})
    if step % 10 == 0 or step == 1:
        ms = timer.lap() / (10 if step > 1 else 1)
        # rewarddance: the two terms of its loss as well (the rationale's per-token, unweighted)
        terms = f" | score_ce {metrics['score_ce']:.4f} | rationale {metrics['rationale']:.4f}" if args.stage == "rewarddance" else ""
        common.print0(f"step {step:5d} | loss {metrics['loss']:.4f}{terms} | grad {metrics['grad_norm']:.2f} | lr {lr:.2e} | "
                      f"{ms:.0f} ms/step | {args.batch_size / ms * 1000:.1f} samples/s{common.peak_memory(device)}")
    if step % args.save_every == 0 or step == args.steps:
        common.save_checkpoint(args.out, ddp_model, optimizer, step, batches, args, mode=eval_mode, stage=args.stage)
    if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
        table, _ = common.evaluate_sharded(ddp_model, test, eval_mode, max_new_tokens=96)
        common.print0(format_table(table, f"step {step} | test ({eval_mode} mode)"))
        common.write_json(args.out, "eval", {"step": step, "method": args.stage, "table": table})

common.dist_cleanup()
common.exit_worker()
