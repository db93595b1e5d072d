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
   (the paper starts from a pretrained Qwen3.5 with a system prompt instead). --direct-items adds
   one-token items (K per record, or K per record of a dimension), whose target is the trace's own
   score line; --direct-only trains those alone (the first one-token run of make base-v2 and
   base-v3: alignment on one-item prompts, README). Zero-shot, GRPO and GDSO start from the
   result; `make base` regenerates the shipped assets/tiny_base.safetensors and
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
from data import DIMENSIONS, SCORE_MARKER, parse_score, score_to_level
from eval import format_table
from zr_kernels import score_ce
from model import BIN_TOKENS

EVAL_MODES = {"sft": "direct", "rewarddance": "rewarddance", "base": "reasoning"}  # how each stage's model scores
TRACE_TOKENS = 96  # the base's answers (captions, traces): the context check's length and the evaluation's budget


def direct_counts(text):
    """--direct-items: "K" (every dimension) or "dimension=K,..." -> {dimension: K}."""
    try:
        if "=" not in text:
            return dict.fromkeys(DIMENSIONS, int(text))
        counts = {d.strip(): int(k) for d, k in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K or dimension=K,... with whole numbers K")
    unknown = sorted(set(counts) - set(DIMENSIONS))
    if unknown or min(counts.values()) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: " + (f"unknown dimension {unknown[0]!r}; expected some of "
                                         f"{', '.join(DIMENSIONS)}" if unknown else "a count below 0"))
    return counts


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SFT baseline (direct score token), the RewardDance baseline and the "
                                            "tiny world's base pretraining")
    p.add_argument("--stage", default="sft", choices=["sft", "rewarddance", "base"],
                   help="sft: direct score CE; rewarddance: score CE + post-hoc rationale loss; "
                        "base: tiny-world captions + traces")
    p.add_argument("--rationale-weight", type=float, default=1.0,
                   help="rewarddance: weight of the rationale's per-token loss beside the score CE")
    p.add_argument("--model", default="tiny", help="'tiny', an HF folder / hub id, or a score-model .safetensors")
    p.add_argument("--init", default="", help="start from this score-model .safetensors (overrides --model)")
    p.add_argument("--data", default="runs/world", help="folder with train.jsonl and test.jsonl (README, Data), "
                                                        "or world:n=200,seed=0 to render the synthetic world")
    p.add_argument("--holdout", default="", help="a JSONL whose prompts are dropped from the training data "
                                                 "(base stage: the labeled world's test split)")
    p.add_argument("--out", default="runs/sft.safetensors", help="checkpoint path (.safetensors; .train.pt beside it)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; base stage 2400)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (samples per optimizer step)")
    p.add_argument("--micro-batch", type=int, default=32,
                   help="samples per forward per rank (gradient accumulation fills the rest)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3; base stage, a language model from scratch: 3e-3)")
    p.add_argument("--vision-lr-mult", type=float, default=1.0,
                   help="lr multiplier for the vision tower (with --no-freeze-vision)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine to 0.1x")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--eval-every", type=int, default=100,
                   help="evaluate on the test split every N steps (0 = only at the end)")
    p.add_argument("--eval-limit", type=int, default=512, help="test records per periodic evaluation (0 = all)")
    p.add_argument("--save-every", type=int, default=100, help="write the checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --out (+ .train.pt) exactly")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop (after saving) at this step, keeping the --steps schedule; --resume continues")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 compute (fp32 master weights and optimizer state)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP replication")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--direct-items", type=direct_counts, nargs="?", const=dict.fromkeys(DIMENSIONS, 1), default="0",
                   metavar="K|D=K,...",
                   help="base stage: also train the one-token direct answer on the trace's own (generic-rubric) "
                        "score, so that the base can score without reasoning as a pretrained VLM can: K items per "
                        "record and epoch (K = 1 without a value), or per dimension, e.g. alignment=4,realism=1 "
                        "(a dimension not named gets none)")
    p.add_argument("--direct-only", action="store_true",
                   help="base stage: train the one-token items alone, no captions or traces (the first "
                        "one-token run of make base-v2 and base-v3: alignment on one-item prompts)")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the vision tower frozen (default; the tiny base's tower is trained in a stage of its "
                        "own, world.py)")
    args = p.parse_args(argv)
    # a language model from scratch (base stage) wants a larger lr and more steps; an explicit value always wins
    args.lr = args.lr if args.lr is not None else (3e-3 if args.stage == "base" else 1e-3)
    args.steps = args.steps if args.steps is not None else (2400 if args.stage == "base" else 300)
    if args.steps < 1:
        p.error(f"--steps must be at least 1 (got {args.steps}): a run of no steps would write nothing")
    if args.rationale_weight < 0:
        p.error(f"--rationale-weight must be >= 0 (got {args.rationale_weight})")
    return args


# -----------------------------------------------------------------------------
# what each stage trains on: (kind, record, text) items


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


def load_data(args):
    """-> (train file, training records, test records), read and checked before any model loads."""
    train_file, test_file = common.data_files(args.data, "train.jsonl", "test.jsonl")
    train, test = common.load_records(train_file), common.load_records(test_file)
    if args.holdout:
        held = {r["prompt"] for r in common.load_records(args.holdout, labeled=False)}
        train = [r for r in train if r["prompt"] not in held]
        common.print0(f"held out {len(held)} prompts of {args.holdout}: {len(train)} training records left")
    if args.eval_limit:
        test = test[:args.eval_limit]
    return train_file, train, test


def training_items(args, train, train_file):
    """(kind, record, text) per training item. kind "direct": the score token's CE on the label (sft; base with
    --direct-items, on the trace's own score); "rewarddance": the label's score token, then `text`, the
    rationale; "caption" / "reasoning" (base): the next-token loss on `text`, the caption or the trace."""
    if args.stage == "sft":
        return [("direct", r, None) for r in train]
    if args.stage == "rewarddance":
        items = [("rewarddance", r, rationale_of(r)) for r in train]
        bad = next((r for _, r, text in items if text is None), None)
        if bad is not None:
            common.fail(f"{train_file}: record {bad['id']!r} has no 'rationale' (a non-empty string): "
                        f"--stage rewarddance trains on the score followed by its rationale (README, Data)")
        return items
    # base: one captioning item per image, one reasoning item per (image, dimension) with its trace,
    # and --direct-items one-token items per record (--direct-only: those alone)
    if not all("trace" in r for r in train):
        raise SystemExit(f"{train_file} has records without a 'trace': --stage base needs the synthetic world")
    if args.direct_only and not any(args.direct_items.values()):
        common.fail("--direct-only trains the one-token items alone: give --direct-items K (K >= 1)")
    items = [("direct", r, None) for r in train for _ in range(args.direct_items.get(r["dimension"], 0))]
    if not args.direct_only:
        images = {r["image_path"]: r for r in train}
        items += [("caption", r, r["caption"]) for r in images.values() if "caption" in r]
        items += [("reasoning", r, r["trace"]) for r in train]
    return items


def answer_ids(tokenizer, stage, text, r=None):
    """The answer tokens: the caption or trace (base), or the score token then the rationale
    (rewarddance), then the end of the turn."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if stage != "rewarddance":
        return ids
    # the label's bin token first (one token, model.py checks it), the rationale on the next line
    score = tokenizer.encode(BIN_TOKENS[score_to_level(r["score"]) - 1], add_special_tokens=False)
    return score + tokenizer.encode("\n", add_special_tokens=False) + ids


# -----------------------------------------------------------------------------
# the model


def load_checked_model(args, items, train, test):
    """The score model to train, checked against the data: every training answer and test query fits its context."""
    # fp32 master weights (--bf16 is compute only); under FSDP2 built on meta, each rank reads only its shard
    model = common.load_model(args.init or args.model, seed=args.seed, meta=common.sharded(args.fsdp))
    if args.stage == "base" and model.source != "tiny":
        raise SystemExit("--stage base pretrains the embedded tiny model; real models start from their own pretraining")
    # the longest answer must fit when training; scoring reads one token (sft, rewarddance) or a trace (base)
    if args.stage == "rewarddance":
        answer_len = max(len(answer_ids(model.tokenizer, args.stage, t, r)) for _, r, t in items)
    else:
        answer_len = TRACE_TOKENS if args.stage == "base" else 1
    common.check_context(model, train, EVAL_MODES[args.stage], answer_len)
    common.check_context(model, test, EVAL_MODES[args.stage], TRACE_TOKENS if args.stage == "base" else 1)
    if args.freeze_vision:
        model.vision_tower().requires_grad_(False)
    return model


# -----------------------------------------------------------------------------
# the loss


def target_counts(chunk, stage, tokenizer):
    """What normalizes the loss, before any forward: (samples with a score CE, tokens with a
    next-token loss). rewarddance's tokens are the answer's after the score token."""
    if stage == "base":
        return (sum(kind == "direct" for kind, _, _ in chunk),
                sum(len(answer_ids(tokenizer, stage, text)) for kind, _, text in chunk if kind != "direct"))
    if stage == "rewarddance":
        return len(chunk), sum(len(answer_ids(tokenizer, stage, text, r)) - 1 for _, r, text in chunk)
    return len(chunk), 0


def score_losses(ddp_model, chunk, stage, device, bins=None):
    """sft / rewarddance: (the score token's CE summed over samples, the rationale's next-token loss summed over
    its tokens; 0 for sft). The CE's target is each label's nearest bin unless `bins` gives others."""
    inner = common.unwrap(ddp_model)
    records = [r for _, r, _ in chunk]
    # rewarddance teacher-forces score + rationale; the score is read before the answer either way
    answers = [answer_ids(inner.tokenizer, stage, text, r) for _, r, text in chunk] if stage == "rewarddance" else None
    batch = inner.encode([r["prompt"] for r in records], common.open_images(records),
                         [r["dimension"] for r in records], EVAL_MODES[stage], completions=answers)
    score_index = torch.full((len(records),), batch["prompt_len"] - 1, device=device)
    targets = None
    if answers is not None:
        # the rationale's tokens only: position Lp - 1 predicts the score token, whose loss is
        # the bin CE below (Eq. 8), not a second, full-vocabulary term
        targets = inner.completion_targets(batch, answers)
        targets[:, batch["prompt_len"] - 1] = -100
    out = ddp_model(batch, score_index, targets=targets)
    if bins is None:
        bins = torch.tensor([score_to_level(r["score"]) - 1 for r in records], device=device)  # nearest bin
    nll = -out["token_logprobs"].sum() if targets is not None else torch.zeros((), device=device)
    return score_ce(out["score_logits"], bins).sum(), nll


def base_losses(ddp_model, chunk, device):
    """base: (the direct score token's CE on the trace's own score, --direct-items; the next-token loss of
    the captions and traces, each answer followed by the end of the turn), summed."""
    inner = common.unwrap(ddp_model)
    nll = ce = torch.zeros((), device=device)
    direct = [item for item in chunk if item[0] == "direct"]
    if direct:
        # the SFT stage's one-token forward and CE, on the trace's own score instead of the label
        trace_bins = torch.tensor([parse_score(r["trace"]) - 1 for _, r, _ in direct], device=device)
        ce, _ = score_losses(ddp_model, direct, "sft", device, bins=trace_bins)
    for mode in ("caption", "reasoning"):
        sub = [(r, text) for kind, r, text in chunk if kind == mode]
        if not sub:
            continue
        answers = [answer_ids(inner.tokenizer, "base", text) for _, text in sub]
        records = [r for r, _ in sub]
        batch = inner.encode([r["prompt"] for r in records], common.open_images(records),
                             [r["dimension"] for r in records], mode, completions=answers)
        targets = inner.completion_targets(batch, answers)
        score_index = torch.full((len(records),), batch["prompt_len"] - 1, device=device)
        nll = nll - ddp_model(batch, score_index, targets=targets)["token_logprobs"].sum()
    return ce, nll


def accumulate_gradients(ddp_model, chunks, args, world, device):
    """Forward and backward of every micro-batch, normalized by the step's global counts; -> this rank's
    share of the step's mean (score CE, next-token loss)."""
    tokenizer = common.unwrap(ddp_model).tokenizer
    # the step's global counts (samples, tokens; all ranks and micro-batches), counted first; a
    # count of 0 has no loss term to normalize (max 1)
    counts = [target_counts(c, args.stage, tokenizer) for c in chunks]
    n_samples = max(common.all_sum(sum(n for n, _ in counts)), 1.0)
    n_tokens = max(common.all_sum(sum(n for _, n in counts)), 1.0)
    weight = token_loss_weight(args)
    ce_sum, nll_sum = 0.0, 0.0
    for i, chunk in enumerate(chunks):
        # one micro-batch's graph alive at a time; gradients reduced across ranks on the last one only
        with common.grad_sync(ddp_model, i == len(chunks) - 1):
            if args.stage == "base":
                ce, nll = base_losses(ddp_model, chunk, device)
            else:
                ce, nll = score_losses(ddp_model, chunk, args.stage, device)
            # DDP / FSDP average over ranks; x world makes each term its global sum over its count
            (ce * world / n_samples + weight * nll * world / n_tokens).backward()
        ce_sum, nll_sum = ce_sum + float(ce.detach()), nll_sum + float(nll.detach())
    return ce_sum * world / n_samples, nll_sum * world / n_tokens


def token_loss_weight(args):
    """The weight of the next-token loss beside the score CE: the whole loss (base), the rationale's
    (rewarddance), none (sft)."""
    return {"sft": 0.0, "base": 1.0, "rewarddance": args.rationale_weight}[args.stage]


def train_step(ddp_model, optimizer, batches, step, args, micro, world, device):
    """One optimizer step on the next global batch; -> (metrics averaged over ranks, lr)."""
    lr = common.lr_at(step, args.steps, args.lr, args.warmup)
    common.set_lr(optimizer, lr)
    mine = batches.next()
    chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
    ddp_model.train()
    ce_mean, nll_mean = accumulate_gradients(ddp_model, chunks, args, world, device)
    # this rank's share of the step's mean loss (x world): all_mean over ranks gives the global mean
    loss = ce_mean + token_loss_weight(args) * nll_mean
    grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), args.clip)
    common.check_finite_step(step, grad_norm, loss)  # stop, before a NaN update
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {"loss": loss, "score_ce": ce_mean, "rationale": nll_mean, "grad_norm": float(grad_norm)}
    return common.all_mean(metrics), lr


# -----------------------------------------------------------------------------
# the script


def log_step(step, metrics, lr, timer, args, device):
    """Steps 1, 10, 20, ...: the losses, the gradient norm, the lr and the speed since the last line."""
    if step % 10 and step != 1:
        return
    ms = timer.lap() / (10 if step > 1 else 1)
    # rewarddance: the two terms of its loss as well (the rationale's per-token, unweighted)
    terms = (f" | score_ce {metrics['score_ce']:.4f} | rationale {metrics['rationale']:.4f}"
             if args.stage == "rewarddance" else "")
    common.print0(f"step {step:5d} | loss {metrics['loss']:.4f}{terms} | grad {metrics['grad_norm']:.2f} | "
                  f"lr {lr:.2e} | {ms:.0f} ms/step | {args.batch_size / ms * 1000:.1f} samples/s"
                  f"{common.peak_memory(device)}")


def eval_mode(args):
    """How the trained model scores: its stage's mode; a --direct-only base stage's model, in one token."""
    return "direct" if args.stage == "base" and args.direct_only else EVAL_MODES[args.stage]


def evaluate(ddp_model, test, step, args):
    """Score the test split (all ranks), print the table, write NAME.eval.json and a NAME.curve.jsonl line."""
    mode = eval_mode(args)
    table, _ = common.evaluate_sharded(ddp_model, test, mode, max_new_tokens=TRACE_TOKENS)
    common.print0(format_table(table, f"step {step} | test ({mode} mode)"))
    common.write_json(args.out, "eval", {"step": step, "method": args.stage, "table": table})


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.dist_init()
    common.seed_all(args.seed + rank)
    # the data first: a missing file, a bad record or a batch larger than the data stops the run before
    # any model is loaded
    train_file, train, test = load_data(args)
    items = training_items(args, train, train_file)
    micro, accum = common.split_batch(args.batch_size, args.micro_batch, world)
    common.check_batch(len(items), args.batch_size, "--batch-size", "training items", world)
    batches = common.Batches(items, args.batch_size, rank, world, seed=args.seed)
    model = load_checked_model(args, items, train, test)
    ddp_model = common.wrap(model, device, fsdp=args.fsdp, bf16=args.bf16, checkpointing=args.checkpointing)
    optimizer = common.build_optimizer(ddp_model, args.lr, args.weight_decay, vision_lr_mult=args.vision_lr_mult)
    step = 0
    if args.resume:
        step, _ = common.load_resume(args.out, ddp_model, optimizer, batches)
        common.print0(f"resumed {args.out} at step {step}")
    common.print0(f"{args.stage} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | "
                  f"{len(items)} items | world {world} x micro {micro} x accum {accum} = {args.batch_size} | "
                  f"{args.steps} steps")
    timer = common.Timer()
    while step < args.steps:
        metrics, lr = train_step(ddp_model, optimizer, batches, step, args, micro, world, device)
        step += 1
        log_step(step, metrics, lr, timer, args, device)
        stopping = step == args.stop_after
        if step % args.save_every == 0 or step == args.steps or stopping:
            common.save_checkpoint(args.out, ddp_model, optimizer, step, batches, args,
                                   mode=eval_mode(args), stage=args.stage)
        if stopping:
            break
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            evaluate(ddp_model, test, step, args)
    common.dist_cleanup()


if __name__ == "__main__":
    main()
    common.exit_worker()
