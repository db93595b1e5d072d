"""
RISD: Reasoning-Internalized Score Distillation of a direct student (Z-Reward, Eqs. 15-16), and the
on-policy distillation (OPD) baseline behind --opd.

1. The frozen teacher (a reasoning-mode score-model checkpoint, e.g. from gdso.py) writes a trace
   rho_T per unlabeled (prompt, image, dimension) and its score distribution q_T is read at the
   score token after "Score:". Labels are never read: the unlabeled records keep only id, prompt,
   image and dimension. --traces M averages q_T over M sampled traces (default 1, as the paper);
   a trace without a score token is left out of the mean, and a record whose M traces all fail is
   skipped (and counted in the log).
2. The student is prompted in direct mode and reads q_phi at its first answer token: one forward,
   one output token, no reasoning. Loss (Eq. 15): forward KL(q_T || q_phi) per record (kernels'
   score_kl), summed over the step's records and divided by their global count (all ranks and
   micro-batches), so torchrun and gradient accumulation give the update of one process with the
   whole batch. The deployed reward is the student's mu_phi (Eq. 16).
3. Teacher targets come online (the teacher runs inside the loop on each batch, as in the paper),
   or once into --cache, a safetensors file of q_T (N, K) and a valid mask whose metadata holds the
   teacher file's sha256 and the sampling settings; a later student run reuses it and a stale one
   (other teacher, records or settings) is refused with the mismatch named (--rebuild-cache
   overwrites). The student's --seed is not part of the key, so seeds of a study share one cache.
4. --opd, the baseline of Eqs. 18-19: the student, a reasoning scorer, samples its own trace and
   score y; the teacher scores every visited prefix, A_t = log pi_T(y_t | y_<t) - log pi_old(y_t | y_<t)
   (stop-gradient), and the loss is -mean over sequences of (1/T) sum_t A_t log pi_phi(y_t | y_<t)
   (the gradient of the reverse KL(pi_phi || pi_T) along the sampled path). Both models' log-probs
   come from the fused token log-prob kernel. One update per sampled batch, so pi_old is the
   sampling policy and log pi_old is log pi_phi from the same forward, detached. The teacher must
   read the student's tokens as its own: a different tokenizer is refused.

One iteration of main's loop is one optimizer step: risd_step (teacher targets, then the student's
KL, accumulated over micro-batches) or opd_step (sample, teacher-score, the OPD loss), then the
update, the step's log line, the checkpoint and the evaluation when due.

Checkpoints: the student as --out (.safetensors with metadata mode "direct", or "reasoning" for
--opd; usable by eval.py and reward_ft.py), the newest of the checkpoint sets in NAME.ckpt/ that
--resume continues (common.py, checkpoints), as in gdso.py.

Launch:
    python risd.py --teacher runs/gdso.safetensors                     # tiny world (runs/world), tiny student base
    python risd.py --teacher runs/gdso.safetensors --cache runs/qt.safetensors --traces 4
    python risd.py --teacher runs/gdso.safetensors --opd --out runs/opd.safetensors
    python risd.py --teacher runs/gdso.safetensors --throughput       # images/s: student vs teacher
    torchrun --nproc_per_node=8 risd.py --teacher t27b.safetensors --student Qwen/Qwen3.5-9B \\
        --data my_unlabeled --bf16 --fsdp --checkpointing --batch-size 256 --micro-batch 8 \\
        --max-new-tokens 1024 --lr 1e-5 --cache runs/qt27b.safetensors
"""

import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

import common
from data import format_table
from eval import evaluate_sharded
from zr_kernels import score_kl
from model import BINS, PROMPT_VERSION, write_checkpoint

# -----------------------------------------------------------------------------
# the RISD and OPD terms (pure functions of tensors; tests check them on toys)


def kl_loss(student_logits, q_teacher, valid=None, n=None):
    """Eq. 15: sum over valid rows of KL(q_T || softmax(student_logits)), divided by n.

    student_logits (N, K), q_teacher (N, K) probabilities (a constant), valid (N,) bool. n is the
    normalizer, default the valid rows here; training passes the global count of the step.
    """
    kl = score_kl(student_logits, q_teacher.detach().to(student_logits.device))  # (N,)
    if valid is not None:
        kl = torch.where(valid, kl, torch.zeros_like(kl))  # a masked row gets no gradient either
    count = n if n is not None else (valid.sum().clamp_min(1) if valid is not None else kl.shape[0])
    return kl.sum() / count


def opd_loss(logp, logp_teacher, logp_old, mask, n=None):
    """Eq. 19: -(1/n) sum over sequences of (1/T) sum_t sg(A_t) log pi_phi(y_t), A_t of Eq. 18.

    logp, logp_teacher, logp_old: (N, T) log-probs of the sampled tokens under the student being
    trained, the teacher and the sampling student; mask (N, T) marks real completion tokens.
    Returns (loss, mean advantage over the masked tokens). n defaults to N.
    """
    adv = (logp_teacher - logp_old).detach()  # (N, T), A_t = log pi_T - log pi_old
    mask = mask.to(logp.dtype)
    per_seq = (adv * logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # (N,), (1/T) sum_t
    loss = -per_seq.sum() / (n if n is not None else logp.shape[0])
    return loss, (adv * mask).sum() / mask.sum().clamp_min(1)


def mean_over_traces(probs, valid):
    """q_T averaged over M traces: probs (M, N, K), valid (M, N) -> (q (N, K), ok (N,)).

    A trace without a score token is left out of the mean; ok is False where all M failed (q = 0).
    """
    w = valid.to(probs.dtype)  # (M, N)
    n = w.sum(0)  # (N,)
    q = (probs * w[..., None]).sum(0) / n.clamp_min(1)[:, None]
    return q, n > 0


# -----------------------------------------------------------------------------
# the q_T cache: a safetensors file keyed by the teacher's hash and the sampling settings


def file_sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(teacher_sha256, ids, traces, temperature, max_new_tokens, teacher_seed):
    """Everything q_T depends on, as a dict of JSON values (stored in the cache's metadata)."""
    ids_hash = hashlib.sha256("\n".join(str(i) for i in ids).encode()).hexdigest()
    return {"teacher_sha256": teacher_sha256, "records_sha256": ids_hash, "n_records": len(ids),
            "traces": int(traces), "temperature": float(temperature), "max_new_tokens": int(max_new_tokens),
            "teacher_seed": int(teacher_seed), "bins": list(BINS), "prompt_version": PROMPT_VERSION}


def write_cache(path, q, valid, key):
    """q (N, K) float32 and valid (N,) written atomically, with the key as JSON metadata."""
    tensors = {"q_teacher": q.float().cpu().contiguous(), "valid": valid.to(torch.uint8).cpu().contiguous()}
    write_checkpoint(path, tensors, {"format": "zreward-teacher-cache-v1", "key": json.dumps(key)})


def read_cache(path, key):
    """-> (q, valid) if the cache at path was made with exactly `key`; else a ValueError naming the mismatch."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "zreward-teacher-cache-v1":
            raise ValueError(f"{path} is not a RISD teacher cache (format {meta.get('format')!r})")
        theirs = json.loads(meta["key"])
        diff = [k for k in sorted(set(key) | set(theirs)) if theirs.get(k) != key.get(k)]
        if diff:
            what = "; ".join(f"{k}: cache {theirs.get(k)!r} vs now {key.get(k)!r}" for k in diff)
            raise ValueError(f"stale teacher cache {path}: it was built with other settings ({what}). "
                             f"Pass --rebuild-cache to overwrite it, or another --cache path.")
        return f.get_tensor("q_teacher"), f.get_tensor("valid").bool()


# -----------------------------------------------------------------------------
# teacher targets, tokenizers, throughput


@torch.no_grad()
def teacher_targets(teacher, records, traces=1, temperature=1.0, max_new_tokens=64):
    """The teacher's q_T for records, averaged over `traces` sampled traces: (q (N, K), ok (N,)).

    All M traces of a record are sampled in one generate call (the batch repeated M times).
    """
    prompts = [r["prompt"] for r in records] * traces
    dims = [r["dimension"] for r in records] * traces
    out = teacher.score_with_reasoning(prompts, common.open_images(records) * traces, dims, max_new_tokens, temperature)
    N, K = len(records), out.probs.shape[-1]
    return mean_over_traces(out.probs.float().view(traces, N, K), out.valid.view(traces, N))


def tokenizer_fingerprint(tokenizer):
    """What decides the token ids of a text: the model (vocab, merges), added tokens, normalizer, pre-tokenizer."""
    j = json.loads(tokenizer.backend_tokenizer.to_str())
    added = sorted((t["id"], t["content"]) for t in j.get("added_tokens") or [])
    return {"model": j.get("model"), "added_tokens": added, "normalizer": j.get("normalizer"),
            "pre_tokenizer": j.get("pre_tokenizer")}


def check_same_tokenizer(teacher, student):
    """OPD: the teacher scores the student's sampled token ids, so both must tokenize alike."""
    a, b = tokenizer_fingerprint(teacher.tokenizer), tokenizer_fingerprint(student.tokenizer)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"--opd needs one tokenizer for teacher and student (the teacher scores the student's "
                         f"token ids), but their tokenizers differ in {diff}; use RISD (no --opd), which "
                         f"only needs the shared score bins")


@torch.no_grad()
def throughput(model, records, mode, batch_size, batches=3, max_new_tokens=64):
    """(images/s, output tokens per query) of model.score on a few batches, after one warm-up batch."""
    chunks = [records[a:a + batch_size] for a in range(0, len(records), batch_size)][:batches + 1]
    if len(chunks) < 2:
        raise ValueError(f"--throughput needs at least {2 * batch_size} test records, got {len(records)}")
    n, tokens, seconds = 0, 0.0, 0.0
    for i, recs in enumerate(chunks):
        images = common.open_images(recs)
        t0 = time.perf_counter()
        out = model.score([r["prompt"] for r in recs], images, [r["dimension"] for r in recs], mode=mode,
                          max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        if i == 0:
            continue  # warm-up: allocator, first-call dispatch
        n, seconds = n + len(recs), seconds + dt
        tokens += len(recs) if out.traces is None else sum(
            len(model.tokenizer.encode(t, add_special_tokens=False)) + 1 for t in out.traces)
    return n / seconds, tokens / n


# -----------------------------------------------------------------------------
# the teacher's targets: once into --cache, or online inside risd_step


def teacher_cache(args, teacher, records, rank, world, device):
    """q_T of every record from --cache -> (q (N, K), ok (N,), the teacher file's sha256).

    A cache made with exactly this key (teacher file, records, sampling settings) is reused, any
    other is refused (--rebuild-cache overwrites it); else it is built: each rank scores an
    interleaved shard under --teacher-seed, rank 0 writes the file, every rank keeps all of it.
    """
    teacher_sha = file_sha256(args.teacher)
    key = cache_key(teacher_sha, [r["id"] for r in records], args.traces, args.teacher_temperature,
                    args.max_new_tokens, args.teacher_seed)
    if os.path.exists(args.cache) and not args.rebuild_cache:
        try:
            q, ok = read_cache(args.cache, key)
        except ValueError as e:
            common.fail(str(e))
        common.print0(f"reusing teacher cache {args.cache} ({int(ok.sum())} / {len(records)} records valid)")
        return q, ok, teacher_sha
    timer = common.Timer()
    shard = list(range(rank, len(records), world))  # this rank's records, interleaved
    parts = []
    # the cache depends on --teacher-seed, not on --seed, and leaves the run's RNG as it was
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(args.teacher_seed + rank)
        with common.rollout_mode(teacher) as t:
            for a in range(0, len(shard), args.micro_batch):
                parts.append(teacher_targets(t, [records[i] for i in shard[a:a + args.micro_batch]], args.traces,
                                             args.teacher_temperature, args.max_new_tokens))
    q_shard = torch.cat([q for q, _ in parts]).cpu() if parts else torch.zeros(0, len(BINS))
    ok_shard = torch.cat([ok for _, ok in parts]).cpu() if parts else torch.zeros(0, dtype=torch.bool)
    gathered = [(shard, q_shard, ok_shard)]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, (shard, q_shard, ok_shard))
    q, ok = torch.zeros(len(records), len(BINS)), torch.zeros(len(records), dtype=torch.bool)
    for idx, q_part, ok_part in gathered:
        q[idx], ok[idx] = q_part, ok_part
    if common.is_main():
        write_cache(args.cache, q, ok, key)
    if dist.is_initialized():
        dist.barrier()
    common.print0(f"wrote teacher cache {args.cache}: {int(ok.sum())} / {len(records)} records valid, "
                  f"M={args.traces} traces, {timer.lap() / 1000:.1f} s")
    return q, ok, teacher_sha


# -----------------------------------------------------------------------------
# one optimizer step: RISD (Eq. 15) or OPD (Eqs. 18-19), gradients accumulated over micro-batches


def risd_step(model, teacher, records, chunks, q_cache, args, world, device):
    """Eq. 15 on this rank's micro-batches (`chunks` of record indices); leaves the gradients in
    place -> logs: this rank's share of the step's mean KL, valid fraction, skipped records."""
    # 1. q_T of every micro-batch first (online: the teacher samples its traces now), so that the
    # global count of valid records, the loss's divisor, is known before any backward
    if q_cache is not None:
        targets = [(q_cache[chunk].to(device), torch.ones(len(chunk), dtype=torch.bool, device=device))
                   for chunk in chunks]
    else:
        with common.rollout_mode(teacher) as t:
            targets = [teacher_targets(t, [records[i] for i in chunk], args.traces, args.teacher_temperature,
                                       args.max_new_tokens) for chunk in chunks]
    n_valid = sum(int(ok.sum()) for _, ok in targets)
    n_global = max(common.all_sum(n_valid), 1.0)
    # 2. the student in direct mode: one forward, q_phi read at the first answer position
    model.train()
    student = common.unwrap(model)
    kl_share = 0.0
    for j, (chunk, (q, ok)) in enumerate(zip(chunks, targets)):
        recs = [records[i] for i in chunk]
        batch = student.encode([r["prompt"] for r in recs], common.open_images(recs), [r["dimension"] for r in recs],
                               "direct")
        idx = torch.full((len(recs),), batch["prompt_len"] - 1, device=device)
        with common.grad_sync(model, j == len(chunks) - 1):  # reduced across ranks once, on the last micro-batch
            logits = model(batch, idx)["score_logits"]  # (B, K)
            # the sum over this rank's valid records / (n_global / world): DDP / FSDP average the
            # ranks' gradients, so the update is that of the mean over the step's valid records
            loss = kl_loss(logits, q, ok.to(device), n=n_global / world)
            loss.backward()
        kl_share += float(loss.detach()) / world  # summed over ranks: the step's mean KL
    n = sum(len(chunk) for chunk in chunks)
    return {"kl": kl_share, "valid": n_valid / n, "skipped": n - n_valid}


def trace_logprobs(module, model, prompts, images, dims, traces, temperature, device):
    """(B, T) log pi(y_t | x, y_<t) of the traces' tokens under `module` (a wrapped model; `model`,
    its ScoreModel, encodes) at `temperature`, and the (B, T) mask of real tokens, T the longest
    trace: position Lp - 1 + t of the teacher-forced batch predicts y_t (Lp the padded prompt)."""
    batch = model.encode(prompts, images, dims, "reasoning", completions=traces)
    targets = model.completion_targets(batch, traces)
    Lp, T = batch["prompt_len"], max(len(t) for t in traces)
    idx = torch.full((len(traces),), Lp - 1, device=device)
    logp = module(batch, idx, targets=targets, temperature=temperature)["token_logprobs"]
    return logp[:, Lp - 1:Lp - 1 + T], targets[:, Lp - 1:Lp - 1 + T] != -100


def opd_step(model, teacher, records, chunks, args, device):
    """Eqs. 18-19 on this rank's micro-batches: the student samples a trace per record, the teacher
    scores each of its tokens; leaves the gradients in place -> logs."""
    recs = [records[i] for chunk in chunks for i in chunk]
    images = common.open_images(recs)
    prompts, dims = [r["prompt"] for r in recs], [r["dimension"] for r in recs]
    micro = len(chunks[0])  # every micro-batch has this many records (common.split_batch)
    parts = [slice(a, a + micro) for a in range(0, len(recs), micro)]
    with common.rollout_mode(model) as m:  # pi_old samples, no collectives inside
        traces = [t for s in parts for t in m.generate(m.encode(prompts[s], images[s], dims[s], "reasoning"),
                                                       args.max_new_tokens, args.temperature)]
    # the student sampled from softmax(logits / T): its log-probs, and the teacher's it moves
    # toward, are read at that T (A_t of Eq. 18)
    temperature = args.temperature if args.temperature > 0 else 1.0
    model.train()
    logs = {"loss": 0.0, "adv": 0.0}
    for j, s in enumerate(parts):
        inputs = (prompts[s], images[s], dims[s], traces[s], temperature, device)
        with torch.no_grad():
            logp_teacher, _ = trace_logprobs(teacher, common.unwrap(teacher), *inputs)
        with common.grad_sync(model, j == len(parts) - 1):  # reduced across ranks once, on the last micro-batch
            logp, mask = trace_logprobs(model, common.unwrap(model), *inputs)
            # one update per sample: pi_old is the sampling policy, its log-probs this forward's, detached
            loss, adv = opd_loss(logp, logp_teacher, logp.detach(), mask, n=len(recs))
            loss.backward()  # a sum over this rank's sequences / their count; DDP averages the ranks
        logs["loss"] += float(loss.detach())
        logs["adv"] += float(adv) / len(parts)
    logs["length"] = sum(len(t) for t in traces) / len(traces)
    logs["valid"] = sum(common.unwrap(model).find_score_index(t) >= 0 for t in traces) / len(traces)
    return logs


def print_step(args, step, logs, grad_norm, lr, timer, world, device):
    """The step's line, averaged over ranks (RISD's KL: summed, each rank holding its share)."""
    if args.opd:
        logs = common.all_mean(dict(logs, grad_norm=float(grad_norm)))
        ms = timer.lap()
        what = (f"loss {logs['loss']:+.4f} | adv {logs['adv']:+.4f} | len {logs['length']:.1f} | "
                f"valid {logs['valid']:.2f}")
    else:
        skipped = common.all_sum(logs["skipped"])
        logs = common.all_mean({"kl": logs["kl"], "valid": logs["valid"], "grad_norm": float(grad_norm)})
        ms = timer.lap()
        what = f"kl {logs['kl'] * world:.4f} | teacher valid {logs['valid']:.2f} (skipped {int(skipped)})"
    common.print0(f"step {step:4d} | {what} | grad {logs['grad_norm']:.2f} | lr {lr:.1e} | {ms:.0f} ms | "
                  f"{args.batch_size / ms * 1000:.1f} samples/s{common.peak_memory(device)}")


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="RISD student distillation from a reasoning teacher (and the OPD baseline)")
    p.add_argument("--teacher", required=True,
                   help="the frozen teacher: a reasoning-mode score-model .safetensors (e.g. from gdso.py)")
    p.add_argument("--student", default=common.asset("tiny_student_base.safetensors"),
                   help="student init: a score-model .safetensors (default: the tiny student base, a third of the "
                        "teacher's size), 'tiny', or an HF folder / hub id")
    common.add_run_flags(p, {"--data": "runs/world", "--out": None, "--steps": 300, "--batch-size": 32,
                         "--micro-batch": 32, "--lr": None, "--warmup": 30, "--weight-decay": 0.01, "--clip": 1.0,
                         "--eval-every": 100, "--eval-limit": 512, "--save-every": 100, "--resume": False,
                         "--stop-after": 0, "--seed": 0, "--bf16": False, "--fsdp": False,
                         "--checkpointing": False},
                         notes={
                             "--data": "test.jsonl and unlabeled.jsonl, or train.jsonl with its labels ignored",
                             "--out": "default runs/risd.safetensors, or runs/opd.safetensors with --opd",
                             "--batch-size": "records",
                             "--lr": "default 1e-3 for RISD, 2e-4 for OPD",
                             "--seed": "data order and online sampling",
                             "--bf16": "the teacher: bf16 weights",
                         }, types={"--steps": common.nonnegative_int})
    p.add_argument("--unlabeled", default="",
                   help="JSONL of (id, prompt, image, dimension) to distill on (default: --data's unlabeled.jsonl, "
                        "else its train.jsonl, labels ignored)")
    p.add_argument("--limit", type=common.nonnegative_int, default=0,
                   help="use only the first N unlabeled records (0 = all)")
    p.add_argument("--opd", action="store_true",
                   help="the on-policy distillation baseline (Eqs. 18-19) instead of RISD")
    p.add_argument("--cache", default="",
                   help="RISD: compute q_T once into this safetensors file and reuse it (default: online, in the loop)")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="overwrite a --cache built with another teacher or other settings")
    p.add_argument("--traces", type=common.positive_int, default=1,
                   help="M: q_T is the mean over M sampled teacher traces (the paper: 1)")
    p.add_argument("--teacher-temperature", type=common.nonnegative_float, default=1.0,
                   help="teacher trace sampling temperature (0 = greedy)")
    p.add_argument("--teacher-seed", type=common.nonnegative_int, default=0,
                   help="seed of the teacher's sampling when building --cache (part of its key)")
    p.add_argument("--temperature", type=common.nonnegative_float, default=1.0,
                   help="OPD: student rollout sampling temperature")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=64,
                   help="trace length budget (teacher traces; OPD rollouts)")
    p.add_argument("--eval-teacher", action="store_true",
                   help="also evaluate the teacher (reasoning, greedy) once at the start")
    p.add_argument("--throughput", action="store_true",
                   help="only measure images/s of the student (direct) vs the teacher (reasoning) and exit")
    common.add_freeze_flags(p, whose="the student")
    args = p.parse_args(argv)  # every value is checked by its type (common.RUN_FLAGS, the ones above)
    if args.steps < 1 and not args.throughput:
        p.error(f"argument --steps: must be at least 1, got {args.steps} (0 only with --throughput)")
    args.method = "opd" if args.opd else "risd"
    args.lr = args.lr if args.lr is not None else (2e-4 if args.opd else 1e-3)
    if args.out is None:  # the default depends on --opd: checked as a given --out is
        try:
            args.out = common.checkpoint_path(f"runs/{args.method}.safetensors")
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --out: {e}")
    if args.opd and args.cache:
        p.error("--cache holds RISD's q_T; OPD scores the student's own fresh samples, online")
    if not args.teacher.endswith(".safetensors"):
        p.error(f"--teacher must be a score-model .safetensors checkpoint, got {args.teacher!r}")
    return args


def load_data(args, world):
    """The data, before any model (README, Data) -> (unlabeled records, test records). The unlabeled
    records come from --unlabeled, else the folder's unlabeled.jsonl, else its train.jsonl with
    the labels ignored; the labeled test.jsonl is for evaluation only."""
    (test_file,) = common.data_files(args.data, "test.jsonl")
    folder = os.path.dirname(test_file)
    if args.unlabeled:
        unlabeled_file = args.unlabeled
    elif os.path.isfile(os.path.join(folder, "unlabeled.jsonl")):
        unlabeled_file = os.path.join(folder, "unlabeled.jsonl")
    else:
        (unlabeled_file,) = common.data_files(args.data, "train.jsonl")
    # only what the teacher and the student read, so no label can leak in
    records = [{k: r[k] for k in ("id", "prompt", "image_path", "dimension")}
               for r in common.load_records(unlabeled_file, labeled=False)]
    records = records[:args.limit] if args.limit else records
    test = common.load_records(test_file)
    common.warn_overlap(records, test, unlabeled_file, test_file)
    test = test[:args.eval_limit] if args.eval_limit else test
    if not args.throughput:
        common.check_batch(len(records), args.batch_size, "--batch-size", f"unlabeled records in {unlabeled_file}",
                           world)
    return records, test


def load_teacher(path, dtype=None, meta=False):
    """The frozen teacher; refused unless it is a reasoning-mode score-model checkpoint. meta: built
    on the meta device, each rank filling only its shard when it is sharded (common.load_model)."""
    if not str(path).endswith(".safetensors"):
        common.fail(f"--teacher must be a score-model .safetensors checkpoint, got {path!r}")
    teacher = common.load_model(path, dtype=dtype, meta=meta)
    mode = teacher.metadata.get("mode")
    if mode != "reasoning":
        common.fail(f"--teacher {path} is a {mode!r}-mode checkpoint; RISD / OPD distill a reasoning-mode "
                    f"teacher (one written by gdso.py or tiny_base.py)")
    return teacher


def load_models(args, records, test, student_mode, meta):
    """-> (teacher, student), not yet placed; refused before any work: a teacher not in reasoning
    mode, an OPD student with another tokenizer, a record that does not fit either model."""
    dtype = torch.bfloat16 if args.bf16 else None  # the frozen teacher may keep bf16 weights
    teacher = load_teacher(args.teacher, dtype, meta)
    student = common.load_model(args.student, seed=args.seed, meta=meta)  # fp32 master weights; --bf16 is compute only
    common.check_resume_model(args, student, f"--student {args.student}")
    if args.opd:
        try:
            check_same_tokenizer(teacher, student)
        except ValueError as e:
            common.fail(str(e))
    student_answer = args.max_new_tokens if args.opd else 1  # a trace, or the one score token
    common.check_context(teacher, records, "reasoning", args.max_new_tokens)
    common.check_context(student, records, student_mode, student_answer)
    common.check_context(student, test, student_mode, student_answer)
    return teacher, student


def print_throughput(student, teacher, test, args, device):
    """The deployment cost: images/s of one direct token against a trace then the score, same batch."""
    speed = {}
    for name, m, mode in (("student", student, "direct"), ("teacher", teacher, "reasoning")):
        m.to(device).eval()
        speed[name], tokens = throughput(m, test, mode, args.micro_batch, max_new_tokens=args.max_new_tokens)
        common.print0(f"{name:8s} | {mode:9s} | batch {args.micro_batch} | {tokens:6.1f} output tokens/query | "
                      f"{speed[name]:8.1f} images/s | {device}")
    common.print0(f"student / teacher: {speed['student'] / speed['teacher']:.1f}x images/s")


def evaluate(model, test, mode, args, kind, title, **entry):
    """eval.py's table of `model` on the test records, printed and written to NAME.KIND.json."""
    table, _ = evaluate_sharded(model, test, mode, max_new_tokens=args.max_new_tokens)
    common.print0(format_table(table, title))
    common.write_json(args.out, kind, {**entry, "table": table})


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.dist_init()
    if not args.throughput:  # before any model loads: what --resume continues, and with which flags
        common.check_resume(args)
    common.seed_all(args.seed + rank)
    records, test = load_data(args, world)
    student_mode = "reasoning" if args.opd else "direct"
    # under FSDP2 both models are built on the meta device and each rank reads only its shards
    # (common.wrap); --throughput scores with whole models on one rank
    teacher, student = load_models(args, records, test, student_mode, common.sharded(args.fsdp) and not args.throughput)
    if args.throughput:
        if rank == 0:
            print_throughput(student, teacher, test, args, device)
        common.dist_cleanup()
        return
    teacher = common.wrap_frozen(teacher, device, fsdp=args.fsdp, bf16=args.bf16)
    if args.eval_teacher:
        evaluate(teacher, test, "reasoning", args, "teacher", f"teacher {args.teacher} | test (reasoning mode, greedy)",
                 method="teacher", teacher=args.teacher)
    q_cache, teacher_sha, items = None, None, list(range(len(records)))
    if args.cache:
        q_cache, ok, teacher_sha = teacher_cache(args, teacher, records, rank, world, device)
        items = [i for i in items if ok[i]]  # records whose M traces all failed: skipped
    batches = common.Batches(items, args.batch_size, rank, world, seed=args.seed)
    micro, accum = common.split_batch(args.batch_size, args.micro_batch, world)
    common.freeze(student, args)
    model = common.wrap(student, device, fsdp=args.fsdp, bf16=args.bf16, checkpointing=args.checkpointing)
    optimizer = common.build_optimizer(model, args.lr, args.weight_decay)
    step = common.resume_step(args, model, optimizer, batches)
    common.print0(f"{args.method} | teacher {args.teacher} | student {args.student} ({student_mode} mode) | "
                  f"{len(items)} unlabeled records | world {world} x micro {micro} x accum {accum} = "
                  f"{args.batch_size} | targets {'cache ' + args.cache if args.cache else 'online'} | M={args.traces}")
    timer = common.Timer()
    while step < args.steps:
        lr = common.lr_at(step, args.steps, args.lr, args.warmup)
        common.set_lr(optimizer, lr)
        indices = batches.next()  # this rank's records of the step
        chunks = [indices[a:a + micro] for a in range(0, len(indices), micro)]
        if args.opd:
            logs = opd_step(model, teacher, records, chunks, args, device)
        else:
            logs = risd_step(model, teacher, records, chunks, q_cache, args, world, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        common.check_finite_step(step, grad_norm, logs.get("kl", logs.get("loss")))  # stop, before a NaN update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        print_step(args, step, logs, grad_norm, lr, timer, world, device)
        do_save, stop, do_eval = common.after_step(step, args)
        if do_save:
            common.save_checkpoint(args.out, model, optimizer, step, batches, args, mode=student_mode,
                                   stage=args.method, teacher=args.teacher,
                                   **({"teacher_sha256": teacher_sha} if teacher_sha else {}))
        if stop:
            break
        if do_eval:
            evaluate(model, test, student_mode, args, "eval", f"step {step} | test ({student_mode} mode)",
                     step=step, method=args.method)
    common.dist_cleanup()


if __name__ == "__main__":
    main()
    common.exit_worker()
