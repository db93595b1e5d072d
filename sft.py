"""
Supervised training of the score model: the paper's two baselines without reasoning.

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

Each stage is a `Stage` (what it trains on, the loss, how its model scores) on one training loop,
`train`; tiny_base.py runs the tiny world's base pretraining as a third stage on the same loop.

Loss normalization: the score CE is summed over a rank's samples and divided by the step's global
number of samples; the token loss (rewarddance: the rationale; tiny_base.py: the answer) is summed
over a rank's tokens and divided by the step's global number of those tokens (all ranks, all
micro-batches), i.e. a per-token mean over the step, so a long rationale weighs more than a short
one. Any world size and accumulation then gives the same update as one process with the whole
batch. Both counts are known before any forward (the batch size; the tokenized answers' lengths),
so each micro-batch runs forward and backward at once and only one micro-batch's activations are
alive at a time; gradients are reduced across ranks on the last micro-batch only.

Launch:
    python tiny_world.py render --out runs/world --n 200 --seed 0                 # the tiny world (the default --data)
    python sft.py --init assets/tiny_base.safetensors --out runs/sft.safetensors  # SFT baseline
    python sft.py --stage rewarddance --init assets/tiny_base.safetensors --out runs/rewarddance.safetensors
    torchrun --nproc_per_node=8 sft.py --model Qwen/Qwen3.5-27B --data my_data --bf16 --fsdp \\
        --batch-size 256 --micro-batch 4 --lr 1e-5 --out runs/sft27b.safetensors
"""

import argparse

import torch

import common
import tiny_world
from data import SCORE_MARKER, format_table, score_to_level
from eval import evaluate_sharded
from model import BIN_TOKENS
from zr_kernels import score_ce


def build_parser(description, stage_flag=True):
    """The flags of the supervised loop, for sft.py and for tiny_base.py (stage_flag=False: it is one stage)."""
    p = argparse.ArgumentParser(description=description)
    if stage_flag:
        p.add_argument("--stage", default="sft", choices=list(STAGES),
                       help="sft: direct score CE; rewarddance: score CE + post-hoc rationale loss")
        p.add_argument("--rationale-weight", type=common.nonnegative_float, default=1.0,
                       help="rewarddance: weight of the rationale's per-token loss beside the score CE")
    p.add_argument("--model", default="tiny", help="'tiny', an HF folder / hub id, or a score-model .safetensors")
    p.add_argument("--init", default="", help="start from this score-model .safetensors (overrides --model)")
    common.add_run_flags(p, {"--data": "runs/world", "--out": "runs/sft.safetensors", "--steps": 300,
                         "--batch-size": 32, "--micro-batch": 32, "--lr": 1e-3, "--weight-decay": 0.01,
                         "--warmup": 30, "--clip": 1.0, "--eval-every": 100, "--eval-limit": 512,
                         "--save-every": 100, "--resume": False, "--stop-after": 0, "--seed": 0, "--bf16": False,
                         "--fsdp": False, "--checkpointing": False},
                         notes={"--data": "train.jsonl and test.jsonl", "--batch-size": "samples"})
    p.add_argument("--holdout", default="", help="a JSONL whose prompts are dropped from the training data "
                                                 "(e.g. a test split whose prompts must stay unseen)")
    p.add_argument("--vision-lr-mult", type=common.positive_float, default=1.0,
                   help="lr multiplier for the vision tower (with --no-freeze-vision)")
    common.add_freeze_flags(p)
    return p


def get_args(argv=None):
    p = build_parser("SFT baseline (direct score token) and the RewardDance baseline")
    return p.parse_args(argv)  # every value is checked by its type (common.RUN_FLAGS)


# -----------------------------------------------------------------------------
# what each stage trains on: (kind, record, text) items


def answer_ids(tokenizer, text, score=None):
    """The answer's tokens: `text` then the end of the turn; with a score (rewarddance), the score's bin
    token first and the text (the rationale) on the next line."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if score is None:
        return ids
    # the label's bin token first (one token, model.py checks it), the rationale on the next line
    head = tokenizer.encode(BIN_TOKENS[score_to_level(score) - 1], add_special_tokens=False)
    return head + tokenizer.encode("\n", add_special_tokens=False) + ids


def rationale_of(r):
    """The post-hoc rationale of a labeled record: its `rationale`, else (the tiny world) its trace
    without the final "Score:" line; None if it has neither."""
    if "rationale" in r:
        return r["rationale"] if isinstance(r["rationale"], str) and r["rationale"].strip() else None
    if "scene" not in r:
        return None
    trace = r.get("trace") or tiny_world.make_trace(r["scene"], tiny_world.parse_prompt(r["prompt"]), r["dimension"])
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
    common.warn_overlap(train, test, train_file, test_file)
    if args.eval_limit:
        test = test[:args.eval_limit]
    return train_file, train, test


# -----------------------------------------------------------------------------
# the model


def load_checked_model(args, stage, items, train, test):
    """The score model to train, checked against the data: every training answer and test query fits its context."""
    # fp32 master weights (--bf16 is compute only); under FSDP2 built on meta, each rank reads only its shard
    model = common.load_model(args.init or args.model, seed=args.seed, meta=common.sharded(args.fsdp))
    common.check_resume_model(args, model, f"--init {args.init}" if args.init else f"--model {args.model}")
    stage.check_model(model)
    # the longest answer must fit when training; scoring reads one token, or a trace (tiny_base.py)
    common.check_context(model, train, stage.mode, stage.answer_len(model, items))
    common.check_context(model, test, stage.mode, stage.eval_tokens)
    common.freeze(model, args)
    return model


# -----------------------------------------------------------------------------
# the loss


def score_losses(ddp_model, chunk, mode, device, bins=None):
    """sft / rewarddance: (the score token's CE summed over samples, the rationale's next-token loss summed over
    its tokens; 0 for sft). The CE's target is each label's nearest bin unless `bins` gives others."""
    inner = common.unwrap(ddp_model)
    records = [r for _, r, _ in chunk]
    # rewarddance teacher-forces score + rationale; the score is read before the answer either way
    answers = [answer_ids(inner.tokenizer, text, r["score"]) for _, r, text in chunk] if mode == "rewarddance" else None
    batch = inner.encode([r["prompt"] for r in records], common.open_images(records),
                         [r["dimension"] for r in records], mode, completions=answers)
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


# -----------------------------------------------------------------------------
# the stages


class Stage:
    """One supervised stage on the loop below: its items, what normalizes their loss, the loss and how
    its model scores. This one is the SFT baseline: the direct score token's CE on the label."""
    name, mode = "sft", "direct"
    eval_tokens = 1  # output tokens per scored record: the context check's length and the evaluation's budget

    def items(self, args, train, train_file):
        """(kind, record, text) per training item: ("direct", record, None), the score CE on its label."""
        return [("direct", r, None) for r in train]

    def check_model(self, model):
        """Refuse a model this stage cannot train (any model will do for SFT)."""

    def answer_len(self, model, items):
        """The longest answer a training item teacher-forces: the score token."""
        return 1

    def counts(self, chunk, tokenizer):
        """What normalizes the loss, before any forward: (samples with a score CE, tokens with a
        next-token loss)."""
        return len(chunk), 0

    def losses(self, ddp_model, chunk, device):
        """(the score CE summed over samples, the next-token loss summed over tokens)."""
        return score_losses(ddp_model, chunk, self.mode, device)

    def token_weight(self, args):
        """The weight of the next-token loss beside the score CE."""
        return 0.0

    def eval_mode(self, args):
        """How the trained model scores (it goes into the checkpoint)."""
        return self.mode


class RewardDance(Stage):
    """The RewardDance baseline: the label's score token, then its rationale, then the end of the turn;
    the score CE plus --rationale-weight x the rationale's per-token loss. It scores in one token."""
    name, mode = "rewarddance", "rewarddance"

    def items(self, args, train, train_file):
        items = [("rewarddance", r, rationale_of(r)) for r in train]
        bad = next((r for _, r, text in items if text is None), None)
        if bad is not None:
            common.fail(f"{train_file}: record {bad['id']!r} has no 'rationale' (a non-empty string): "
                        f"--stage rewarddance trains on the score followed by its rationale (README, Data)")
        return items

    def answer_len(self, model, items):
        return max(len(answer_ids(model.tokenizer, text, r["score"])) for _, r, text in items)

    def counts(self, chunk, tokenizer):
        # the tokens after the score token: the score's own loss is the bin CE (Eq. 8)
        return len(chunk), sum(len(answer_ids(tokenizer, text, r["score"])) - 1 for _, r, text in chunk)

    def token_weight(self, args):
        return args.rationale_weight


STAGES = {"sft": Stage(), "rewarddance": RewardDance()}


# -----------------------------------------------------------------------------
# the loop


def accumulate_gradients(ddp_model, chunks, args, stage, world, device):
    """Forward and backward of every micro-batch, normalized by the step's global counts; -> this rank's
    share of the step's mean (score CE, next-token loss)."""
    tokenizer = common.unwrap(ddp_model).tokenizer
    # the step's global counts (samples, tokens; all ranks and micro-batches), counted first; a
    # count of 0 has no loss term to normalize (max 1)
    counts = [stage.counts(c, tokenizer) for c in chunks]
    n_samples = max(common.all_sum(sum(n for n, _ in counts)), 1.0)
    n_tokens = max(common.all_sum(sum(n for _, n in counts)), 1.0)
    weight = stage.token_weight(args)
    ce_sum, nll_sum = 0.0, 0.0
    for i, chunk in enumerate(chunks):
        # one micro-batch's graph alive at a time; gradients reduced across ranks on the last one only
        with common.grad_sync(ddp_model, i == len(chunks) - 1):
            ce, nll = stage.losses(ddp_model, chunk, device)
            # DDP / FSDP average over ranks; x world makes each term its global sum over its count
            (ce * world / n_samples + weight * nll * world / n_tokens).backward()
        ce_sum, nll_sum = ce_sum + float(ce.detach()), nll_sum + float(nll.detach())
    return ce_sum * world / n_samples, nll_sum * world / n_tokens


def train_step(ddp_model, optimizer, batches, step, args, stage, micro, world, device):
    """One optimizer step on the next global batch; -> (metrics averaged over ranks, lr)."""
    lr = common.lr_at(step, args.steps, args.lr, args.warmup)
    common.set_lr(optimizer, lr)
    mine = batches.next()
    chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
    ddp_model.train()
    ce_mean, nll_mean = accumulate_gradients(ddp_model, chunks, args, stage, world, device)
    # this rank's share of the step's mean loss (x world): all_mean over ranks gives the global mean
    loss = ce_mean + stage.token_weight(args) * nll_mean
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


def evaluate(ddp_model, test, step, args, stage):
    """Score the test split (all ranks), print the table, write NAME.eval.json and a NAME.curve.jsonl line."""
    mode = stage.eval_mode(args)
    table, _ = evaluate_sharded(ddp_model, test, mode, max_new_tokens=stage.eval_tokens)
    common.print0(format_table(table, f"step {step} | test ({mode} mode)"))
    common.write_json(args.out, "eval", {"step": step, "method": args.stage, "table": table})


def train(args, stage):
    """The supervised loop: data, model, then --steps optimizer steps of `stage`, with checkpoints and evaluations."""
    rank, world, device = common.dist_init()
    common.check_resume(args)  # before any model loads: what --resume continues, and with which flags
    common.seed_all(args.seed + rank)
    # the data first: a missing file, a bad record or a batch larger than the data stops the run before
    # any model is loaded
    train_file, train, test = load_data(args)
    items = stage.items(args, train, train_file)
    micro, accum = common.split_batch(args.batch_size, args.micro_batch, world)
    common.check_batch(len(items), args.batch_size, "--batch-size", "training items", world)
    batches = common.Batches(items, args.batch_size, rank, world, seed=args.seed)
    model = load_checked_model(args, stage, items, train, test)
    ddp_model = common.wrap(model, device, fsdp=args.fsdp, bf16=args.bf16, checkpointing=args.checkpointing)
    optimizer = common.build_optimizer(ddp_model, args.lr, args.weight_decay, vision_lr_mult=args.vision_lr_mult)
    step = common.resume_step(args, ddp_model, optimizer, batches)
    common.print0(f"{args.stage} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | "
                  f"{len(items)} items | world {world} x micro {micro} x accum {accum} = {args.batch_size} | "
                  f"{args.steps} steps")
    timer = common.Timer()
    while step < args.steps:
        metrics, lr = train_step(ddp_model, optimizer, batches, step, args, stage, micro, world, device)
        step += 1
        log_step(step, metrics, lr, timer, args, device)
        do_save, stop, do_eval = common.after_step(step, args)
        if do_save:
            common.save_checkpoint(args.out, ddp_model, optimizer, step, batches, args,
                                   mode=stage.eval_mode(args), stage=args.stage)
        if stop:
            break
        if do_eval:
            evaluate(ddp_model, test, step, args, stage)
    common.dist_cleanup()


def main(argv=None):
    args = get_args(argv)
    train(args, STAGES[args.stage])


if __name__ == "__main__":
    main()
    common.exit_worker()
