"""
The tiny world's base pretraining (the embedded default only), a stage on sft.py's training loop.

The language model of a tiny VLM whose vision tower was trained first (tiny_world.py tower) learns
image captions and the templated item-by-item traces of a pretraining world of its own (not the
labeled world the methods train on, and without its test prompts: --holdout), with the tower frozen.
The traces' score lines follow a generic rubric (every defect one point, tiny_world.generic_scores),
not the annotators': the result reads images well and scores on the wrong scale, the tiny world's
stand-in for a pretrained VLM before it learns a rubric (the paper starts from a pretrained Qwen3.5
with a system prompt instead). --direct-items adds one-token items (K per record, or K per record of
a dimension) whose target is the trace's own score line; --direct-only trains those alone.
Zero-shot, GRPO and GDSO start from the result; `make base` regenerates the shipped
assets/tiny_base.safetensors and assets/tiny_student_base.safetensors (docs/TINY_WORLD.md).

The loss is sft.py's, normalized the same way: the captions' and traces' next-token loss per token
of the step, plus the one-token items' score CE per item.

Launch:
    make base                                                                     # both bases, ~50 min on a CPU
    python tiny_world.py render --out runs/pretrain --n 4000 --seed 1 --trace-rubric generic --test-frac 0.02
    python tiny_world.py tower --size teacher --out runs/base/tower-teacher.safetensors
    python tiny_base.py --init runs/base/tower-teacher.safetensors --data runs/pretrain \
        --holdout runs/world/test.jsonl --steps 3000 --out runs/base/base-teacher.safetensors
"""

import argparse

import torch

import common
import sft
from data import DIMENSIONS, parse_score

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


class Base(sft.Stage):
    """Captions and traces (next-token loss), and --direct-items one-token items on each trace's own score."""
    name, mode, eval_tokens = "base", "reasoning", TRACE_TOKENS

    def items(self, args, train, train_file):
        """One captioning item per image, one reasoning item per (image, dimension) with its trace, and
        --direct-items one-token items per record (--direct-only: those alone)."""
        if not all("trace" in r for r in train):
            common.fail(f"{train_file} has records without a 'trace': tiny_base.py needs the synthetic world")
        if args.direct_only and not any(args.direct_items.values()):
            common.fail("--direct-only trains the one-token items alone: give --direct-items K (K >= 1)")
        items = [("direct", r, None) for r in train for _ in range(args.direct_items.get(r["dimension"], 0))]
        if not args.direct_only:
            images = {r["image_path"]: r for r in train}
            items += [("caption", r, r["caption"]) for r in images.values() if "caption" in r]
            items += [("reasoning", r, r["trace"]) for r in train]
        return items

    def check_model(self, model):
        if model.source != "tiny":
            common.fail("tiny_base.py pretrains the embedded tiny model; real models start from their own "
                        "pretraining")

    def answer_len(self, model, items):
        return TRACE_TOKENS

    def counts(self, chunk, tokenizer):
        return (sum(kind == "direct" for kind, _, _ in chunk),
                sum(len(sft.answer_ids(tokenizer, text)) for kind, _, text in chunk if kind != "direct"))

    def losses(self, ddp_model, chunk, device):
        """(the direct score token's CE on the trace's own score, --direct-items; the next-token loss of
        the captions and traces, each answer followed by the end of the turn), summed."""
        inner = common.unwrap(ddp_model)
        nll = ce = torch.zeros((), device=device)
        direct = [item for item in chunk if item[0] == "direct"]
        if direct:
            # the SFT stage's one-token forward and CE, on the trace's own score instead of the label
            trace_bins = torch.tensor([parse_score(r["trace"]) - 1 for _, r, _ in direct], device=device)
            ce, _ = sft.score_losses(ddp_model, direct, "direct", device, bins=trace_bins)
        for mode in ("caption", "reasoning"):
            sub = [(r, text) for kind, r, text in chunk if kind == mode]
            if not sub:
                continue
            answers = [sft.answer_ids(inner.tokenizer, text) for _, text in sub]
            records = [r for r, _ in sub]
            batch = inner.encode([r["prompt"] for r in records], common.open_images(records),
                                 [r["dimension"] for r in records], mode, completions=answers)
            targets = inner.completion_targets(batch, answers)
            score_index = torch.full((len(records),), batch["prompt_len"] - 1, device=device)
            nll = nll - ddp_model(batch, score_index, targets=targets)["token_logprobs"].sum()
        return ce, nll

    def token_weight(self, args):
        return 1.0  # the whole answer is the loss

    def eval_mode(self, args):
        """A --direct-only base scores in one token; any other, with a trace."""
        return "direct" if args.direct_only else "reasoning"


def get_args(argv=None):
    p = sft.build_parser("the tiny world's base pretraining: captions, traces and one-token items", stage_flag=False)
    p.add_argument("--direct-items", type=direct_counts, nargs="?", const=dict.fromkeys(DIMENSIONS, 1), default="0",
                   metavar="K|D=K,...",
                   help="also train the one-token direct answer on the trace's own (generic-rubric) score, so that "
                        "the base can score without reasoning as a pretrained VLM can: K items per record and epoch "
                        "(K = 1 without a value), or per dimension, e.g. alignment=4,realism=1 (a dimension not "
                        "named gets none)")
    p.add_argument("--direct-only", action="store_true",
                   help="train the one-token items alone, no captions or traces")
    # a language model from scratch wants a larger lr and more steps than sft.py's defaults
    p.set_defaults(steps=2400, lr=3e-3, out="runs/base.safetensors")
    args = p.parse_args(argv)
    args.stage = "base"  # what the checkpoint records as its stage
    return args


def main(argv=None):
    sft.train(get_args(argv), Base())


if __name__ == "__main__":
    main()
    common.exit_worker()
