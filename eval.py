"""
Evaluation for Z-Reward: score a JSONL with a score model and print the paper's metrics per
dimension (PLCC, SRCC, HPA, margin HPA; data.py computes them), summarize runs into Tables 2 and 3,
plot learning curves.

`eval.py --help` explains the table's columns and the exit status (3: too few reasoning traces
reached a score, --min-valid); --predictions writes one JSON line per record, its nine probabilities
included.

`python eval.py rollouts --ckpt M --data D` measures what GRPO's advantages can work with on a
reasoning model: how many distinct traces a group of G samples holds (rollout_stats).
"""

import argparse
import json
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import common
import tiny_world
from data import DIMENSIONS, SCORE_MARKER, format_table, jsonl_objects, table_from_predictions
from model import BINS
from rating_sets.pairs import aggregate_mu, load_pairs, pair_accuracy

# -----------------------------------------------------------------------------
# scoring a JSONL with a score model, and the table

def predict(model, records, mode="direct", batch_size=32, max_new_tokens=64, progress=True):
    """Score every record with its own dimension: mu (N,) and, in reasoning mode, output lengths.

    Records are batched within a dimension (one rubric prompt per batch) in file order. Returns
    mu, sigma, n_tokens (output tokens per scoring call: 1 in direct and rewarddance modes) and
    valid (reasoning traces that reached a score token) as numpy arrays in record order, and probs
    (N, 9), the score distribution q over the bins.
    """
    N = len(records)
    mu, sigma, n_tok, valid = np.zeros(N), np.zeros(N), np.ones(N), np.ones(N, dtype=bool)
    probs = np.zeros((N, len(BINS)))
    order = sorted(range(N), key=lambda i: records[i]["dimension"])
    chunks = [order[a:a + batch_size] for a in range(0, N, batch_size)]
    with torch.no_grad():
        for idx in tqdm(chunks, desc=f"scoring ({mode})", disable=not progress, leave=False):
            # split a chunk where the dimension changes so each call shares one rubric
            for dim in dict.fromkeys(records[i]["dimension"] for i in idx):
                sub = [i for i in idx if records[i]["dimension"] == dim]
                images = [Image.open(records[i]["image_path"]).convert("RGB") for i in sub]
                out = model.score([records[i]["prompt"] for i in sub], images, dim, mode=mode,
                                  max_new_tokens=max_new_tokens)
                mu[sub], sigma[sub] = out.mean.float().cpu().numpy(), out.std.float().cpu().numpy()
                probs[sub] = out.probs.float().cpu().numpy()
                if out.traces is not None:
                    n_tok[sub] = [len(model.tokenizer.encode(t, add_special_tokens=False)) + 1 for t in out.traces]
                    valid[sub] = out.valid.cpu().numpy()
    return {"mu": mu, "sigma": sigma, "n_tokens": n_tok, "valid": valid, "probs": probs}


def evaluate(model, records, mode="direct", batch_size=32, max_new_tokens=64, progress=True):
    """Metrics per dimension and overall, plus the raw predictions."""
    pred = predict(model, records, mode, batch_size, max_new_tokens, progress)
    return table_from_predictions(records, pred), pred


def evaluate_sharded(model, records, mode, batch_size=32, max_new_tokens=64, layerwise=False):
    """evaluate over all ranks: each scores an interleaved shard, rank 0's table covers all.

    layerwise (common.rollout_mode): every forward gathers units collectively, so every rank must
    make the same calls: each takes the same number of records of each dimension (predict batches
    by dimension), the short ones padded with a repeat whose prediction is dropped."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(records), world))
    real = len(mine)
    if layerwise and world > 1:
        mine, real = balanced_shard(records, rank, world)
    with common.rollout_mode(model, layerwise=layerwise) as inner:
        pred = predict(inner, [records[i] for i in mine], mode, batch_size, max_new_tokens, progress=False)
    mine, pred = mine[:real], {k: v[:real] for k, v in pred.items()}
    parts = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(parts, (mine, pred))
    else:
        parts = [(mine, pred)]
    full = {k: np.zeros((len(records), *v.shape[1:]), dtype=v.dtype) for k, v in pred.items()}
    for idx, p in parts:
        for k in full:
            full[k][idx] = p[k]
    note = nonfinite_note(records, full)
    if note:
        common.print0(f"warning: {note}")
    return table_from_predictions(records, full), full


def balanced_shard(records, rank, world):
    """This rank's record indices when every rank must score as many records of each dimension as the
    others: each dimension's records dealt round-robin, a short share padded with its dimension's first
    record. -> (indices, real): the first `real` are this rank's own, the rest the padding."""
    by_dim = {}
    for i, r in enumerate(records):
        by_dim.setdefault(r["dimension"], []).append(i)
    own, pad = [], []
    for dim in sorted(by_dim):
        idx = by_dim[dim]
        share = idx[rank::world]
        own += share
        pad += [idx[0]] * (-(-len(idx) // world) - len(share))
    return own + pad, len(own)


def spread_subset(records, n):
    """n records evenly spaced through the file (all when n is 0 or at least len(records))."""
    if not n or n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


def _query_batches(records, batch_size):
    """(prompts, images, dimensions) of consecutive batches of records, images read from disk."""
    for a in range(0, len(records), batch_size):
        rs = records[a:a + batch_size]
        yield ([r["prompt"] for r in rs], [Image.open(r["image_path"]).convert("RGB") for r in rs],
               [r["dimension"] for r in rs])


def greedy_traces(model, records, max_new_tokens=96, batch_size=32):
    """Each record's greedy reasoning trace, in record order."""
    with torch.no_grad():
        return [t for ps, ims, ds in _query_batches(records, batch_size)
                for t in model.score_with_reasoning(ps, ims, ds, max_new_tokens, 0.0).traces]


def rollout_stats(model, records, group=4, temperature=1.0, max_new_tokens=96, batch_size=32, progress=True):
    """What GRPO's advantages can work with: per record, `group` traces sampled as gdso.py's
    rollouts are (reasoning mode, at `temperature`) beside the greedy trace. Returns the mean number
    of distinct traces in a group, the fraction of samples unlike the greedy trace (in all, and in
    the reasoning before the score line alone), the mean within-group std of mu, and the greedy
    traces. When a group holds one trace G times, every advantage in it is zero."""

    reasoning = lambda t: t.split(SCORE_MARKER)[0]  # noqa: E731
    distinct, unlike, unlike_reasoning, mu_std, greedy = [], [], [], [], []
    batches = _query_batches(records, batch_size)
    total = -(-len(records) // batch_size)
    with torch.no_grad():
        for ps, ims, ds in tqdm(batches, total=total, desc="rollouts", disable=not progress, leave=False):
            n = len(ps)
            g = model.score_with_reasoning(ps, ims, ds, max_new_tokens, 0.0).traces
            s = model.score_with_reasoning(ps * group, ims * group, ds * group, max_new_tokens, temperature)
            for i in range(n):
                traces = [s.traces[i + k * n] for k in range(group)]
                distinct.append(len(set(traces)))
                unlike += [t != g[i] for t in traces]
                unlike_reasoning += [reasoning(t) != reasoning(g[i]) for t in traces]
                mu_std.append(float(np.std([s.mean[i + k * n].item() for k in range(group)])))
            greedy += g
    return {"distinct": float(np.mean(distinct)), "unlike_greedy": float(np.mean(unlike)),
            "unlike_greedy_reasoning": float(np.mean(unlike_reasoning)), "mu_std": float(np.mean(mu_std)),
            "greedy": greedy}


TABLE2 = ("plcc", "srcc", "hpa", "margin_hpa", "hpa_same_n")  # the paper's Table 2, + same-count HPA
TABLE3 = ("hpa", "margin_hpa", "tokens")  # Table 3: accuracy against output tokens per scoring call
ORDER = ("count-only", "zero-shot", "sft", "rewarddance", "grpo", "gdso", "student-zero-shot", "student-sft",
         "student-rewarddance", "opd", "risd")
# the paper's claims as paired differences (a - b, per seed): reasoning over direct, GDSO over GRPO,
# a one-token student that keeps its teacher's accuracy, and what a post-hoc rationale adds to SFT
PAIRED = (("gdso", "grpo"), ("grpo", "sft"), ("gdso", "sft"), ("risd", "gdso"), ("risd", "opd"),
          ("risd", "student-sft"), ("rewarddance", "sft"), ("student-rewarddance", "student-sft"))
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t quantiles by dof


def run_name(path):
    """(method, seed) of a run from its file name, METHOD-SEED.eval.json or METHOD-SEED.curve.jsonl
    (seed None without one, e.g. zero-shot.eval.json); the name, not the file's own method field,
    tells apart runs of one script with different models (sft-0 and student-sft-0)"""

    m = re.fullmatch(r"(.+?)(?:-(\d+))?\.(?:eval\.json|curve\.jsonl)", os.path.basename(path))
    if m is None:
        raise ValueError(f"{path}: expected METHOD[-SEED].eval.json or METHOD[-SEED].curve.jsonl")
    return m.group(1), (int(m.group(2)) if m.group(2) else None)


def load_runs(paths):
    """{method: {seed: overall row}} from *.eval.json files"""
    runs = {}
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        method, seed = run_name(p)
        runs.setdefault(method, {})[seed] = r["table"]["overall"]
    return runs


def summarize(paths, columns=TABLE2, methods=None):
    """Mean ± std over seeds of the overall row of *.eval.json files, one line per method."""
    runs = load_runs(paths)
    order = [m for m in ORDER if m in runs] + sorted(m for m in runs if m not in ORDER)
    lines = [f"{'method':<20}{'seeds':>6}" + "".join(f"{c:>17}" for c in columns)]
    for method in order:
        if methods and method not in methods:
            continue
        cells = ""
        for c in columns:
            v = np.array([row[c] for row in runs[method].values()])
            cells += f"{v.mean():>10.3f} ± {v.std():.3f}"
        lines.append(f"{method:<20}{len(runs[method]):>6}{cells}")
    return "\n".join(lines)


def paired_differences(paths, column="hpa", pairs=PAIRED):
    """a - b per seed for each pair of methods, with a 95% t interval over the seeds they share"""
    runs = load_runs(paths)
    lines = [f"{'difference':<38}{'seeds':>6}{'mean':>9}{'95% interval':>20}   per seed"]
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        seeds = sorted(set(runs[a]) & set(runs[b]) - {None})
        d = np.array([runs[a][k][column] - runs[b][k][column] for k in seeds])
        if len(d) == 0:
            continue
        half = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        each = " ".join(f"{x:+.3f}" for x in d)
        interval = f"[{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"
        lines.append(f"{a + ' - ' + b:<38}{len(d):>6}{d.mean():>+9.3f}   {interval}   {each}")
    return "\n".join(lines)


def plot_curves(paths, out, column="hpa"):
    """Test HPA against step, one line per method (mean over seeds, band = min..max), from the
    NAME-SEED.curve.jsonl files the training scripts append to at every evaluation; the zero-shot
    rows found beside them (*zero-shot.eval.json) are dashed lines. Needs matplotlib."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}  # method -> seed -> {step: value}
    for p in paths:
        with open(p) as f:
            for line in f:
                r = json.loads(line)
                method, seed = run_name(p)
                curves.setdefault(method, {}).setdefault(seed, {})[r["step"]] = r["table"]["overall"][column]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    order = [m for m in ORDER if m in curves] + sorted(m for m in curves if m not in ORDER)
    for method in order:
        steps = sorted(set.intersection(*(set(c) for c in curves[method].values())))
        v = np.array([[curves[method][s][k] for k in steps] for s in curves[method]])
        line, = ax.plot(steps, v.mean(0), marker="o", ms=3, label=f"{method} ({len(v)} seeds)")
        ax.fill_between(steps, v.min(0), v.max(0), color=line.get_color(), alpha=0.2)
    # the models the runs start from (zero-shot rows beside the curves, seedless *.eval.json) as dashed lines
    folders = {os.path.dirname(p) or "." for p in paths}
    for p in sorted(os.path.join(d, f) for d in folders for f in os.listdir(d) if f.endswith("zero-shot.eval.json")):
        with open(p) as f:
            y = json.load(f)["table"]["overall"][column]
        ax.axhline(y, ls="--", lw=1, color="gray")
        ax.annotate(run_name(p)[0], (0, y), xycoords=("axes fraction", "data"), xytext=(3, 3),
                    textcoords="offset points", fontsize=7, color="gray")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"test {column.upper().replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def nonfinite_note(records, pred):
    """None, or a line naming how many predictions of mu are NaN / inf (a corrupt or diverged model:
    every comparison with NaN is false, so HPA would read as a plain low number)"""
    bad = np.flatnonzero(~np.isfinite(np.asarray(pred["mu"], dtype=np.float64)))
    if not len(bad):
        return None
    first = ", ".join(repr(records[i]["id"]) for i in bad[:3])
    return f"{len(bad)} of {len(records)} records got a non-finite mu (first: {first}); the model outputs NaN or inf"


def low_valid_note(records, pred, table, min_valid, max_new_tokens):
    """None, or a line counting the records whose trace reached no score, when a row's valid fraction is
    below min_valid: their mu is read at the trace's last token, so the table's numbers mislead."""
    low = [dim for dim, row in table.items() if row["valid"] < min_valid]
    if not low:
        return None
    missing = np.flatnonzero(~np.asarray(pred["valid"], dtype=bool))
    first = ", ".join(repr(records[i]["id"]) for i in missing[:3])
    return (f"{len(missing)} of {len(records)} records have no score in their trace within --max-new-tokens "
            f"{max_new_tokens} (first: {first}); valid is below --min-valid {min_valid:g} in {', '.join(low)} "
            f"(marked *): raise --max-new-tokens, or pass --min-valid 0 to accept the table")


def write_predictions(path, records, pred):
    """One JSON line per record, in the file's order: id, dimension, label, mu, sigma, the nine bin
    probabilities (null where the scorer gives none, e.g. count-only), tokens and valid. A non-finite
    number is written as null (JSON has no NaN)."""
    def num(x):
        x = float(x)
        return x if np.isfinite(x) else None

    probs = pred.get("probs")
    with open(path + ".tmp", "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({"id": r["id"], "dimension": r["dimension"], "score": r["score"],
                                "mu": num(pred["mu"][i]), "sigma": num(pred["sigma"][i]),
                                "probs": None if probs is None else [num(q) for q in probs[i]],
                                "tokens": int(pred["n_tokens"][i]), "valid": bool(pred["valid"][i])}) + "\n")
    os.replace(path + ".tmp", path)


COLUMNS = """\
the table: a row per rubric dimension, then overall (all records); n records in each.
  plcc        Pearson correlation of the predicted score mu (the expectation of the nine-bin
              distribution) with the human label
  srcc        Spearman rank correlation of mu with the label (tied values share their mean rank)
  hpa         human preference accuracy (Eq. 17): over the pairs of records of one group (the
              record's "group", else its prompt) and dimension whose labels differ, the fraction
              that mu orders as the labels do; a tie in mu is a miss
  margin_hpa  hpa over the pairs whose labels differ by more than 0.5
  hpa_same_n  the synthetic world only (nan on other data): hpa over the pairs whose images hold
              the same number of objects, where counting objects cannot order the pair
  tokens      output tokens per scoring call: 1 in the direct and rewarddance modes; in reasoning
              mode the trace, then the score token
  valid       the fraction of records whose reasoning trace reached "Score: N" within
              --max-new-tokens (1 in the one-token modes). A record without a score still counts
              in every column, read at the trace's last token, so the table is only as good as
              this fraction: a row below --min-valid is marked * and eval.py exits with status 3.
exit status: 0 done; 1 a prediction of mu is NaN or inf (a corrupt or diverged model); 2 a user
error (a flag, file or record, named in one line); 3 valid below --min-valid. With 1 or 3 the
table is printed, --predictions written, and --json not (a summary must not take it in)."""


def get_args(argv=None):

    p = argparse.ArgumentParser(description="score a JSONL with a score model and print PLCC / SRCC / HPA "
                                            "(also: eval.py score | pairs | rollouts | summarize | curves)",
                                epilog=COLUMNS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", "--model", dest="ckpt", required=True,
                   help="a score-model .safetensors, a Hugging Face model folder or hub id (zero-shot), 'tiny' "
                        "(the untrained embedded model) or 'count-only' (the synthetic world's shortcut baseline)")
    p.add_argument("--data", required=True, help="labeled JSONL, or a --data folder (its test.jsonl)")
    p.add_argument("--mode", default=None, choices=["direct", "reasoning", "rewarddance"],
                   help="prompt mode; default: the checkpoint's own (direct for an HF model)")
    p.add_argument("--batch-size", type=common.positive_int, default=32, help="queries per forward")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=96,
                   help="reasoning mode: trace length budget")
    p.add_argument("--min-valid", type=common.fraction, default=0.9,
                   help="the least fraction of traces that must reach a score (the valid column); below it the "
                        "row is marked and the exit status is 3 (0 accepts any)")
    p.add_argument("--limit", type=common.nonnegative_int, default=0, help="score only the first N records (0 = all)")
    p.add_argument("--device", type=common.device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--bf16", action="store_true", help="load the model in bfloat16 (a 27B model: 54 GB, not 108)")
    p.add_argument("--json", type=common.writable_file, default="",
                   help="also write the table to this JSON file (for `eval.py summarize`)")
    p.add_argument("--predictions", type=common.writable_file, default="",
                   help="also write one JSON line per record to this file: id, dimension, label, mu, sigma, the "
                        "nine bin probabilities (scores 1.0, 1.5, ..., 5.0), tokens and valid")
    p.add_argument("--method", default="", help="the method name recorded in --json")
    return p.parse_args(argv)


def rollouts_main(argv):
    """`python eval.py rollouts --ckpt M [--against BASE] --data D`: rollout_stats of M, and with
    --against, how many greedy traces training changed."""

    p = argparse.ArgumentParser(prog="eval.py rollouts", description=rollout_stats.__doc__.split(".")[0])
    p.add_argument("--ckpt", required=True, help="a reasoning-mode score-model .safetensors (or HF folder / hub id)")
    p.add_argument("--against", default="", help="another checkpoint (e.g. the base): share of records whose "
                                                 "greedy trace differs between the two")
    p.add_argument("--data", required=True, help="labeled JSONL, or a --data folder (its test.jsonl)")
    p.add_argument("--limit", type=common.nonnegative_int, default=128,
                   help="records, evenly spaced through the file (0 = all)")
    p.add_argument("--group", type=common.positive_int, default=4, help="G: samples per record (gdso.py --group)")
    p.add_argument("--temperature", type=common.nonnegative_float, default=1.0,
                   help="sampling temperature (gdso.py --temperature)")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=96, help="trace length budget")
    p.add_argument("--batch-size", type=common.positive_int, default=32, help="records per generate call")
    p.add_argument("--seed", type=common.nonnegative_int, default=0, help="seed of the sampling")
    p.add_argument("--device", type=common.device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--bf16", action="store_true", help="load the models in bfloat16 (a 27B model: 54 GB, not 108)")
    args = p.parse_args(argv)
    path = args.data if os.path.isfile(args.data) else common.data_files(args.data, "test.jsonl")[0]
    records = spread_subset(common.load_records(path), args.limit)
    dtype = torch.bfloat16 if args.bf16 else None
    torch.manual_seed(args.seed)
    model = common.load_model(args.ckpt, dtype=dtype).to(args.device).eval()
    common.check_context(model, records, "reasoning", args.max_new_tokens)
    st = rollout_stats(model, records, args.group, args.temperature, args.max_new_tokens, args.batch_size)
    del model  # one model on the device at a time
    print(f"{args.ckpt} on {len(records)} records of {path}, G = {args.group} at T = {args.temperature}: "
          f"{st['distinct']:.2f} distinct traces per group | samples unlike the greedy trace {st['unlike_greedy']:.2f} "
          f"(reasoning lines {st['unlike_greedy_reasoning']:.2f}) | within-group std of mu {st['mu_std']:.3f}")
    if args.against:
        other = common.load_model(args.against, dtype=dtype).to(args.device).eval()
        theirs = greedy_traces(other, records, args.max_new_tokens, args.batch_size)
        changed = np.mean([a != b for a, b in zip(st["greedy"], theirs)])
        print(f"greedy traces unlike {args.against}'s: {changed:.2f} of {len(records)} records")


# -----------------------------------------------------------------------------
# scoring images from the command line, and accuracy on pairwise preference benchmarks


def open_image(path, what="image"):
    """An RGB image, or a one-line error naming the file."""
    if not os.path.isfile(path):
        common.fail(f"{what} {path}: no such file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several kinds for a file that is not an image
        common.fail(f"{what} {path}: not a readable image ({type(e).__name__}: {e})")


def read_queries(path):
    """{"prompt", "image"} per line of a JSONL (image relative to the file; other keys ignored) ->
    [{"prompt", "path"}]; a bad line is a one-line error naming the file and the line."""
    if not os.path.isfile(path):
        common.fail(f"--jsonl {path}: no such file")
    root, queries = os.path.dirname(os.path.abspath(path)), []
    try:
        for n, r in jsonl_objects(path):
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("image"), str):
                common.fail(f"{path}:{n}: a record needs \"prompt\" and \"image\" (strings)")
            queries.append({"prompt": r["prompt"], "path": os.path.join(root, r["image"])})
    except ValueError as err:  # a line that is not UTF-8 or not JSON, named by jsonl_objects
        common.fail(str(err))
    if not queries:
        common.fail(f"--jsonl {path}: no records")
    return queries


def score_records(model, queries, dimensions, mode, batch_size=32, max_new_tokens=96):
    """mu, sigma, the nine-bin distribution and valid of every (prompt, image) query on each dimension:
    {dimension: {"mu": (N,), "sigma": (N,), "probs": (N, 9), "valid": (N,)}}; queries carry
    "prompt" and "image" (an RGB image)."""
    out = {}
    prompts, images = [q["prompt"] for q in queries], [q["image"] for q in queries]
    with torch.no_grad():
        for dim in dimensions:
            o = model.score(prompts, images, dim, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens)
            valid = o.valid if o.valid is not None else torch.ones(len(queries), dtype=torch.bool)
            out[dim] = {"mu": o.mean.float().cpu().numpy(), "sigma": o.std.float().cpu().numpy(),
                        "probs": o.probs.float().cpu().numpy(), "valid": valid.cpu().numpy()}
    return out


def scoring_parser(prog, description):
    """The flags `score` and `pairs` share: which model, how it scores, where."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--ckpt", "--model", dest="ckpt", required=True,
                   help="a score-model .safetensors, or a Hugging Face model folder or hub id (zero-shot)")
    p.add_argument("--dimensions", default="all",
                   help=f"comma-separated dimensions to score, or 'all' ({', '.join(DIMENSIONS)})")
    p.add_argument("--mode", default=None, choices=["direct", "reasoning", "rewarddance"],
                   help="prompt mode; default: the checkpoint's own (direct for an HF model)")
    p.add_argument("--batch-size", type=common.positive_int, default=32, help="images per forward")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=96, help="reasoning mode: trace length budget")
    p.add_argument("--device", type=common.device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--bf16", action="store_true", help="load the model in bfloat16")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p


def parse_dimensions(text):
    dims = list(DIMENSIONS) if text == "all" else [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown or not dims:
        common.fail(f"--dimensions {text}: expected 'all' or some of {', '.join(DIMENSIONS)}")
    return dims


def load_scorer(args):
    """The model of --ckpt on --device, and the mode it scores in."""
    model = common.load_model(args.ckpt, dtype=torch.bfloat16 if args.bf16 else None).to(args.device).eval()
    return model, args.mode or getattr(model, "metadata", {}).get("mode", "direct")


def score_main(argv):
    """`python eval.py score --ckpt CKPT --prompt "..." a.png b.png` (or --jsonl FILE of prompt / image
    records): per image and dimension, mu, sigma and the nine-bin distribution."""
    p = scoring_parser("eval.py score", "score images with a score model: mu, sigma and the distribution over "
                                        f"the nine bins {', '.join(f'{b:g}' for b in BINS)}")
    p.add_argument("images", nargs="*", help="image files, all scored against --prompt")
    p.add_argument("--prompt", default=None, help="the generation prompt of the images given on the command line")
    p.add_argument("--jsonl", default="", help="a JSONL of {\"prompt\", \"image\"} records (image relative to the "
                                               "file) instead of --prompt and image arguments")
    args = p.parse_args(argv)
    dims = parse_dimensions(args.dimensions)
    if args.jsonl:
        if args.images or args.prompt is not None:
            common.fail("give either --jsonl FILE, or --prompt and image files, not both")
        queries = read_queries(args.jsonl)
    else:
        if args.prompt is None or not args.images:
            common.fail("give --prompt \"...\" and one or more image files (or --jsonl FILE)")
        queries = [{"prompt": args.prompt, "path": path} for path in args.images]
    for q in queries:  # every image opened before the model loads: a bad file stops here
        q["image"] = open_image(q["path"])
    model, mode = load_scorer(args)
    res = score_records(model, queries, dims, mode, args.batch_size, args.max_new_tokens)
    bins = " ".join(f"{b:>5g}" for b in BINS)
    print(f"{args.ckpt} ({mode} mode): mu and sigma on the 1-5 scale; q over the bins {bins}")
    rows = []
    for i, q in enumerate(queries):
        for dim in dims:
            r = {k: v[i] for k, v in res[dim].items()}
            flag = "" if r["valid"] else "  (no score in the trace)"
            print(f"{q['path']} | {dim:<12} | mu {r['mu']:.3f} | sigma {r['sigma']:.3f} | q "
                  + " ".join(f"{x:.3f}" for x in r["probs"]) + flag)
            rows.append({"image": q["path"], "prompt": q["prompt"], "dimension": dim, "mu": float(r["mu"]),
                         "sigma": float(r["sigma"]), "probs": [float(x) for x in r["probs"]],
                         "valid": bool(r["valid"])})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ckpt": args.ckpt, "mode": mode, "bins": list(BINS), "scores": rows}, f, indent=1)


def parse_weights(text, dims):
    """--weights alignment=2,realism=1 -> {dimension: weight} over `dims` (default: equal)."""
    if not text:
        return None
    try:
        weights = {d.strip(): float(w) for d, w in (part.split("=") for part in text.split(","))}
    except ValueError:
        common.fail(f"--weights {text}: expected dimension=weight,... with numbers")
    if set(weights) - set(dims) or any(not np.isfinite(w) or w < 0 for w in weights.values()) \
            or sum(weights.values()) <= 0:
        common.fail(f"--weights {text}: non-negative weights with a positive sum, for some of {', '.join(dims)}")
    return weights


def pairs_main(argv):
    """`python eval.py pairs --ckpt CKPT --pairs FILE`: accuracy on a pairwise preference benchmark
    (python -m rating_sets.pairs writes one), per dimension and for their aggregate."""
    p = scoring_parser("eval.py pairs", "accuracy of a score model on a pair JSONL (prompt, image_a, image_b, "
                                        "preferred): the share of pairs whose preferred image gets the higher mu "
                                        "(equal mu: half a pair), per dimension and for the weighted mean of the "
                                        "dimensions' mu (the aggregate)")
    p.add_argument("--pairs", required=True, help="a pair JSONL (python -m rating_sets.pairs)")
    p.add_argument("--weights", default="", help="the aggregate's weights, e.g. alignment=2,aesthetics=1 "
                                                 "(default: the scored dimensions, equally)")
    p.add_argument("--limit", type=common.nonnegative_int, default=0, help="the first N pairs only (0 = all)")
    args = p.parse_args(argv)
    dims = parse_dimensions(args.dimensions)
    weights = parse_weights(args.weights, dims)
    try:
        pairs = load_pairs(args.pairs)
    except (ValueError, OSError) as e:
        common.fail(str(e))
    pairs = pairs[:args.limit] if args.limit else pairs
    queries, prompts = [], {}
    for pr in pairs:  # one query per (prompt, image): an image shared by pairs of one prompt is scored once
        for k in ("image_a_path", "image_b_path"):
            key = (pr["prompt"], pr[k])
            if key not in prompts:
                prompts[key] = len(queries)
                queries.append({"prompt": pr["prompt"], "path": pr[k], "image": open_image(pr[k])})
    model, mode = load_scorer(args)
    res = score_records(model, queries, dims, mode, args.batch_size, args.max_new_tokens)
    a = [prompts[(pr["prompt"], pr["image_a_path"])] for pr in pairs]
    b = [prompts[(pr["prompt"], pr["image_b_path"])] for pr in pairs]
    preferred = [pr["preferred"] for pr in pairs]
    per_dim = {d: res[d]["mu"] for d in dims}
    table = {d: pair_accuracy(mu[a], mu[b], preferred) for d, mu in per_dim.items()}
    if len(dims) > 1:
        agg = aggregate_mu(per_dim, weights)
        table["aggregate"] = pair_accuracy(agg[a], agg[b], preferred)
    print(f"{args.ckpt} on {args.pairs} ({len(pairs)} pairs, {mode} mode): pairwise accuracy")
    for k, v in table.items():
        print(f"{k:<14}{v:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ckpt": args.ckpt, "pairs": args.pairs, "n": len(pairs), "mode": mode,
                       "weights": weights, "accuracy": table}, f, indent=1)


def print_summary(paths):
    """`python eval.py summarize runs/results/*.eval.json`: Tables 2 and 3 and the paired differences."""
    print("Table 2 (overall test split; mean ± std over seeds)")
    print(summarize(paths))
    print("\nTable 3 (accuracy against output tokens per scoring call)")
    print(summarize(paths, TABLE3, methods=("opd", "student-sft", "student-rewarddance", "sft", "rewarddance", "gdso",
                                            "risd")))
    print("\nPaired differences of HPA (a - b on the same seed; 95% t interval over seeds)")
    print(paired_differences(paths))


def main(argv=None):

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "summarize":  # python eval.py summarize runs/results/*.eval.json
        print_summary(argv[1:])
        return
    if argv and argv[0] == "curves":  # python eval.py curves OUT.png runs/results/*.curve.jsonl
        print(plot_curves(argv[2:], argv[1]))
        return
    if argv and argv[0] == "rollouts":  # python eval.py rollouts --ckpt M [--against BASE] --data D
        rollouts_main(argv[1:])
        return
    if argv and argv[0] == "score":  # python eval.py score --ckpt M --prompt "..." a.png b.png
        score_main(argv[1:])
        return
    if argv and argv[0] == "pairs":  # python eval.py pairs --ckpt M --pairs PAIRS.jsonl
        pairs_main(argv[1:])
        return

    args = get_args(argv)
    path = args.data if os.path.isfile(args.data) else common.data_files(args.data, "test.jsonl")[0]
    records = common.load_records(path)
    records = records[:args.limit] if args.limit else records
    if args.ckpt == "count-only":
        if not all("scene" in r for r in records):
            common.fail(f"--ckpt count-only reads the synthetic world's scenes; {path} has records without 'scene'")
        mode, pred = "count-only", tiny_world.count_only_predictions(records)
    else:
        model = common.load_model(args.ckpt, dtype=torch.bfloat16 if args.bf16 else None)
        model.to(args.device)
        mode = args.mode or getattr(model, "metadata", {}).get("mode", "direct")
        common.check_context(model, records, mode, args.max_new_tokens if mode == "reasoning" else 1)
        pred = predict(model, records, mode, args.batch_size, args.max_new_tokens)
    table = table_from_predictions(records, pred)
    print(format_table(table, f"{args.ckpt} on {path} ({mode} mode)", min_valid=args.min_valid))
    if args.predictions:
        write_predictions(args.predictions, records, pred)
    note = nonfinite_note(records, pred)
    if note:  # no JSON: a table of NaN predictions must not enter a summary
        print(f"error: {note}", file=sys.stderr)
        raise SystemExit(1)
    note = low_valid_note(records, pred, table, args.min_valid, args.max_new_tokens)
    if note:  # nor one that reads most of its scores off traces that never gave one
        print(f"error: {note}", file=sys.stderr)
        raise SystemExit(3)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": args.method or mode, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
