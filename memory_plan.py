"""
Per-rank GPU memory of the README's launch lines, computed rather than guessed.

Qwen3.5-27B and Qwen3.5-9B are built from their published configs (written out below: nothing is
downloaded) on the meta device, so no weight is allocated, and sharded with FSDP2 exactly as
common.wrap does (every decoder layer and vision block a unit, then the root; bf16 compute, fp32
reduce) over a fake process group of --world ranks on one CPU. What FSDP2 leaves on a rank then
gives exact byte counts:

    params     the fp32 master shard (common.wrap: fp32 weights, bf16 compute)
    grads      the fp32 gradient shard of the trainable weights (the vision tower is frozen)
    adam       AdamW's two fp32 moments of the trainable shard
    pi_ref     GDSO's frozen reference, a bf16 shard (common.wrap_frozen)
    teacher    RISD's frozen 27B teacher, a bf16 shard
    units      training: the root's unsharded bf16 parameters and gradient (FSDP2 keeps the root
               gathered through forward and backward; the embeddings and the LM head are units of
               their own, both models being untied), two units' bf16 parameters (the one
               computing, the one prefetched: the LM head is the largest) and one unit's bf16
               gradient
    rollout    rollout_mode unshards every unit of the generating model for the whole rollout:
               the full model in bf16 on every rank, plus its KV cache / recurrent state; with
               gdso.py --layerwise-rollout the root and a unit at a time instead

The activations are an estimate, stated as one: with --checkpointing every decoder layer keeps
its bf16 input for the recompute, and one layer at a time holds its intermediates (taken as
12 H + 3 I values per token); the token log-probs never form (T, V) logits (zr_kernels/logprob.py).
Sequence length: --image-tokens + --prompt-tokens, plus --max-new-tokens for a trace.

    python memory_plan.py                 # the table of docs/REAL_SCALE.md
    python memory_plan.py --world 16 --max-new-tokens 2048
    rs         FSDP2's fp32 reduce-scatter buffer: a decoder unit's gradient cast to the reduce dtype
    end        the end of the backward, activations freed: the largest unit's (the embeddings' or
               the LM head's) bf16 parameters and gradient and the fp32 reduce-scatter copy of that
               gradient. The training peak is the state (params ... teacher) plus the larger of
               units + rs + activations and end.

Each GDSO row adds one flag of gdso.py to the row above it, each a memory move with a cost (printed
under the table): --micro-samples S (a micro-batch's 2 x G sequences through forward and backward
S at a time: the activations scale with S), --offload (AdamW's state waits in pinned host memory
except during the updates, pi_ref except while it scores: neither is on the GPU during the rollout,
and pi_ref is not during the updates), --layerwise-rollout (the rollout gathers the root and one
unit at a time). The embeddings and the LM head are FSDP units of their own in every row (common.wrap
does so for untied models; before, the root held them gathered from its forward to the end of its
backward: --no-head-units below prints that). What the estimate leaves out: the CUDA context and NCCL buffers (the 4 GiB margin), allocator fragmentation, the
linear-attention layers' fp32 fallback without flash-linear-attention, and backward-time buffers
beyond the reduce-scatter one.

A second table gives the host memory of one process at a save and at a resume, as checkpoints were
written before (the whole model and AdamW state gathered on rank 0, every rank reading the whole
optimizer state back) and as they are now (common.save_sharded: each rank writes and reads its own
shards through torch.distributed.checkpoint, whose file writer stages one tensor at a time, and
rank 0 streams model.safetensors one gathered tensor at a time).
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn

import common

# -----------------------------------------------------------------------------
# the published configs (Qwen3.5 model cards / config.json): hybrid Gated DeltaNet + gated attention,
# every 4th layer full attention, untied embeddings, the same 27-block vision tower

LAYER_PATTERN = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]


def text_config(hidden, intermediate, layers, heads, linear_value_heads):
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                layer_types=LAYER_PATTERN * (layers // len(LAYER_PATTERN)),
                num_attention_heads=heads, num_key_value_heads=4, head_dim=256,
                linear_num_key_heads=16, linear_num_value_heads=linear_value_heads, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0, partial_rotary_factor=0.25,
                                     mrope_section=[11, 11, 10], mrope_interleaved=True))


CONFIGS = {
    "Qwen/Qwen3.5-27B": text_config(hidden=5120, intermediate=17408, layers=64, heads=24, linear_value_heads=48),
    "Qwen/Qwen3.5-9B": text_config(hidden=4096, intermediate=12288, layers=32, heads=16, linear_value_heads=32),
}
VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
              patch_size=16, spatial_merge_size=2, temporal_patch_size=2)

# the README's launch lines: (label, trained model, frozen models, sequences per micro-batch, trace?,
# flags, moves) with moves: micro_samples (sequences per forward), offload (gdso.py --offload),
# layerwise_rollout
G8 = "--micro-pairs 1 --group 8"
M27, M9 = "Qwen/Qwen3.5-27B", "Qwen/Qwen3.5-9B"
MS2, OFF, LAYER = {"micro_samples": 2}, {"micro_samples": 2, "offload": True}, {"layerwise_rollout": True}
RECIPES = [
    ("sft.py 27B", M27, [], 4, False, "--micro-batch 4", {}),
    ("gdso.py 27B", M27, [("pi_ref", M27)], 2 * 8, True, G8, {}),
    ("gdso.py 27B", M27, [("pi_ref", M27)], 2 * 8, True, G8 + " --micro-samples 2", MS2),
    ("gdso.py 27B", M27, [("pi_ref", M27)], 2 * 8, True, G8 + " --micro-samples 2 --offload", OFF),
    ("gdso.py 27B", M27, [("pi_ref", M27)], 2 * 8, True, G8 + " --micro-samples 2 --offload --layerwise-rollout",
     {**OFF, **LAYER}),
    ("gdso.py 9B", M9, [("pi_ref", M9)], 2 * 8, True, G8, {}),
    ("gdso.py 9B", M9, [("pi_ref", M9)], 2 * 8, True, G8 + " --micro-samples 2 --offload", OFF),
    ("risd.py 9B <- 27B", M9, [("teacher", M27)], 8, False, "--micro-batch 8", {}),
]
GIB = 2 ** 30
# assumed for the costs printed under the table (not measured here): host <-> GPU copies of pinned
# memory, and the all-gather bandwidth each GPU receives at over NVLink within a node
PCIE_GBS, NVLINK_GBS = 25.0, 300.0


def build_meta(name):
    """The VLM with every parameter on the meta device: shapes and dtypes, no storage."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = CONFIGS[name]
    config = Qwen3_5Config(text_config=text, vision_config=dict(VISION, out_hidden_size=text["hidden_size"]),
                           tie_word_embeddings=False)
    with torch.device("meta"):
        holder = nn.Module()  # common.wrap shards a ScoreModel through its .vlm
        holder.vlm = Qwen3_5ForConditionalGeneration(config)
    return holder


def shard(holder, mesh, dtype, mp=True):
    """fully_shard as common.wrap / wrap_frozen do; -> per-rank numbers (numel) of this rank."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    holder.to(dtype)
    policy = MixedPrecisionPolicy()
    if mp:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = common._units(holder)
    sizes = [sum(p.numel() for p in u.parameters()) for u in units]  # before sharding: unsharded sizes
    total = sum(p.numel() for p in holder.parameters())
    for u in units:
        fully_shard(u, mesh=mesh, mp_policy=policy)
    fully_shard(holder, mesh=mesh, mp_policy=policy)
    local = trainable = 0
    for name, p in holder.named_parameters():
        n = p.to_local().numel()
        local += n
        trainable += n if ".visual." not in name else 0  # --freeze-vision (default)
    # the root (embeddings, LM head, final norm, vision merger) is a unit of its own, and FSDP2 keeps
    # the root's parameters gathered from its forward to the end of the backward
    vlm = holder.vlm
    embed = vlm.get_input_embeddings().weight.numel() + vlm.get_output_embeddings().weight.numel()
    return {"total": total, "local": local, "trainable": trainable, "unit": max(sizes), "root": total - sum(sizes),
            "vocab_unit": vlm.get_output_embeddings().weight.numel(), "root_embed": embed,
            "trainable_total": sum(p.numel() for n, p in holder.named_parameters() if ".visual." not in n),
            "tied": vlm.get_output_embeddings().weight is vlm.get_input_embeddings().weight,
            "largest": max(p.numel() for p in holder.parameters()),
            "largest_local": max(p.to_local().numel() for p in holder.parameters())}


def activations(name, seqs, tokens):
    """bf16 bytes with --checkpointing: every layer's input kept, one layer's intermediates live."""
    c = CONFIGS[name]
    H, I, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    return 2 * seqs * tokens * (L * H + 12 * H + 3 * I)


def rollout_cache(name, seqs, tokens):
    """KV cache of the full-attention layers (bf16) and the Gated DeltaNet state (fp32) + conv state."""
    c = CONFIGS[name]
    full = c["layer_types"].count("full_attention")
    linear = c["num_hidden_layers"] - full
    kv = full * 2 * c["num_key_value_heads"] * c["head_dim"] * 2 * tokens
    conv_dim = (2 * c["linear_num_key_heads"] * c["linear_key_head_dim"]
                + c["linear_num_value_heads"] * c["linear_value_head_dim"])
    state = linear * (c["linear_num_value_heads"] * c["linear_key_head_dim"] * c["linear_value_head_dim"] * 4
                      + conv_dim * c["linear_conv_kernel_dim"] * 2)
    return seqs * (kv + state)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="per-rank memory of the README's recipes, from FSDP2 on meta tensors")
    p.add_argument("--world", type=int, default=8, help="ranks (GPUs) the models are sharded over")
    p.add_argument("--image-tokens", type=int, default=1024,
                   help="image tokens per query (1024x1024 pixels / 32^2)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="rubric prompt text tokens per query")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="trace length (gdso, the RISD teacher)")
    p.add_argument("--head-units", action=argparse.BooleanOptionalAction, default=True,
                   help="the embeddings and LM head as FSDP units of their own, as common.wrap makes them for "
                        "untied models (--no-head-units: the root holds them, as before 2026-12-06)")
    return p.parse_args(argv)


def recipe_bytes(args, trained, frozen):
    """Per recipe: (label, flags, bytes per column, training peak, rollout peak or None)."""
    prompt = args.image_tokens + args.prompt_tokens
    rows = []
    for label, name, frozen_models, seqs, trace, flags, moves in RECIPES:
        t = trained[name]
        b = {"params": 4 * t["local"], "grads": 4 * t["trainable"], "adam": 8 * t["trainable"]}
        for role, fname in frozen_models:
            b[role] = 2 * frozen[fname]["local"]
        split = args.head_units and not t["tied"]  # common.wrap: the embeddings and LM head as units
        root, biggest = t["root"], t["unit"]
        if split:  # embeddings and LM head gathered only while they compute
            root, biggest = t["root"] - t["root_embed"], max(t["unit"], t["vocab_unit"])
        # through the backward of the decoder: the root's bf16 parameters and gradient, two units
        # gathered (computing, prefetched), one unit's bf16 gradient and its fp32 reduce-scatter copy
        b["units"] = 2 * 2 * root + 2 * (biggest + t["unit"]) + 2 * biggest
        b["rs"] = 4 * biggest
        tokens = prompt + (args.max_new_tokens if trace else 1)
        b["activations"] = activations(name, min(seqs, moves.get("micro_samples") or seqs), tokens)
        # at the end of the backward, the activations freed: the root's parameters, gradient and the
        # fp32 reduce-scatter copy of that gradient (with embeddings as units: the larger of the two)
        end_unit = max(root, biggest)
        b["end"] = 2 * 2 * end_unit + 4 * end_unit
        state = sum(v for k, v in b.items() if k in ("params", "grads", "adam", "pi_ref", "teacher"))
        if moves.get("offload"):  # pi_ref waits in host memory through the updates
            state -= b.get("pi_ref", 0)
            b["away"] = ("pi_ref",)
        train_peak = state + max(b["units"] + b["rs"] + b["activations"], b["end"])
        # rollouts: GDSO samples from the policy, RISD's teacher writes its traces (grads are freed by then)
        gen = name if label.startswith("gdso") else dict(frozen_models).get("teacher")
        rollout = None
        if gen is not None:
            kept = b["params"]
            if not moves.get("offload"):  # AdamW's state and pi_ref wait in host memory through the rollout
                kept += b["adam"] + sum(b.get(r, 0) for r, _ in frozen_models)
            elif "teacher" in b:
                kept += b["teacher"]
            gathered = 2 * trained[gen]["total"]  # the whole generating model, bf16
            g = trained[gen]
            if moves.get("layerwise_rollout"):  # the root held, a unit computing and the one gathered next
                split = args.head_units and not g["tied"]
                root = g["root"] - g["root_embed"] if split else g["root"]
                biggest = max(g["unit"], g["vocab_unit"]) if split else g["unit"]
                gathered = 2 * (root + 2 * biggest)
            rollout = kept + gathered + rollout_cache(gen, seqs, prompt + args.max_new_tokens)
        rows.append((label, flags, b, train_peak, rollout))
    return rows


def print_plan(args, trained, rows):
    print(f"per-rank GiB, {args.world} ranks, FSDP2 --bf16 (fp32 master weights, bf16 compute), --checkpointing; "
          f"{args.image_tokens + args.prompt_tokens} prompt tokens + {args.max_new_tokens}-token traces")
    for n in CONFIGS:
        print(f"{n}: {trained[n]['total'] / 1e9:.2f}B parameters ({trained[n]['trainable_total'] / 1e9:.2f}B "
              f"trainable without the vision tower); rank 0 holds {trained[n]['local'] / 1e9:.3f}B; largest decoder "
              f"unit {trained[n]['unit'] / 1e6:.0f}M, root {trained[n]['root'] / 1e6:.0f}M")
    cols = ["params", "grads", "adam", "pi_ref", "teacher", "units", "rs", "activations", "end"]
    print("\n| recipe | flags | " + " | ".join(cols) + " | training peak | rollout peak | fits |")
    print("| --- | --- |" + " ---: |" * (len(cols) + 2) + " --- |")
    for label, flags, b, train_peak, rollout in rows:
        peak = max(train_peak, rollout or 0)
        gpus = (("H100 80 GB", 79.1), ("H200 141 GB", 139.8))
        fits = ", ".join(g for g, cap in gpus if peak / GIB < cap - 4) or "neither"
        cells = ["host" if c in b.get("away", ()) else f"{b[c] / GIB:.1f}" if c in b else "-" for c in cols]
        cells += [f"{train_peak / GIB:.1f}", f"{rollout / GIB:.1f}" if rollout else "-", fits]
        print(f"| {label} | `{flags}` | " + " | ".join(cells) + " |")
    print("\n'fits' leaves 4 GiB for the CUDA context, NCCL buffers and fragmentation. 'host': in pinned host "
          "memory through the training phase (--offload; it comes to the GPU to score, while AdamW's state is away).")
    print_costs(args, trained)
    print_host_memory(args, trained)
    print()
    for n in CONFIGS:
        print(f"{n}: accumulating unsharded gradients instead of reduce-scattering per micro-batch "
              f"(FSDP2 set_requires_gradient_sync(False)) would add {4 * trained[n]['trainable_total'] / GIB:.0f} GiB "
              f"per rank (fp32, the reduce dtype)")


def print_costs(args, trained):
    """What each GDSO flag costs per step at 27B, in bytes moved and in seconds at the assumed rates."""
    t, w = trained[M27], args.world
    pairs_per_rank = 64 // w  # the README's launch line: --pairs 64 --micro-pairs 1
    print(f"\nwhat the GDSO flags cost at 27B, {w} ranks, the README's --pairs 64 --group 8 --micro-pairs 1 "
          f"({pairs_per_rank} micro-batches of 16 sequences per rank and step); seconds at an assumed "
          f"{PCIE_GBS:.0f} GB/s host <-> GPU and {NVLINK_GBS:.0f} GB/s all-gather per GPU:")
    print("- --micro-samples S: each chunk gathers every unit twice (forward, backward) and reduce-scatters its "
          "gradient: an update's traffic grows 16/S-fold over one forward of the micro-batch, plus one no-grad "
          "forward per micro-batch for L_pw's gradient (with --alpha-pw > 0)")
    moved = 2 * 8 * t["trainable"] + 2 * 2 * t["local"]  # AdamW state out and back, pi_ref back and out
    print(f"- --offload: {moved / GIB:.1f} GiB per rank per step between host and GPU (AdamW's state out before "
          f"the rollout and back for the updates, pi_ref in to score and out again), ~{moved / 1e9 / PCIE_GBS:.1f} s; "
          f"pinned host memory {(8 * t['trainable'] + 2 * t['local']) / GIB:.1f} GiB per rank, "
          f"{w * (8 * t['trainable'] + 2 * t['local']) / GIB:.0f} GiB per {w}-GPU node")
    per_token = 2 * t["total"] * (w - 1) / w  # each forward gathers every unit once
    tokens = pairs_per_rank * args.max_new_tokens
    print(f"- --layerwise-rollout: each generated token gathers the model: {per_token / 1e9:.1f} GB received per rank "
          f"and token, ~{per_token / 1e9 / NVLINK_GBS:.2f} s; {pairs_per_rank} rollouts x {args.max_new_tokens} tokens "
          f"per step: ~{tokens * per_token / 1e9 / NVLINK_GBS / 60:.0f} min of all-gathers per step (the fast path: "
          f"one gather per rollout). Use it only where --offload alone does not fit.")


def print_host_memory(args, trained):
    """Host memory of one process at a save and a resume, checkpoints gathered (before) and sharded (now)."""
    print(f"\nhost memory of one process at a checkpoint save and at a resume, GiB, {args.world} ranks:")
    print("\n| recipe | save, gathered on rank 0 (before) | resume, every rank (before) | save, sharded (now) | "
          "resume, sharded (now) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, name, frozen in (("sft.py 27B", M27, None), ("gdso.py 27B", M27, M27), ("risd.py 9B <- 27B", M9, None)):
        t = trained[name]
        # before: the fp32 model and the whole AdamW state gathered on rank 0 (and pi_ref in bf16), and
        # every rank's torch.load of the whole AdamW state at a resume
        save_old = 4 * t["total"] + 8 * t["trainable_total"] + (2 * trained[frozen]["total"] if frozen else 0)
        resume_old = 8 * t["trainable_total"]
        # now: rank 0 streams model.safetensors one fp32 tensor at a time beside staging its own shards
        # one tensor at a time; a resume reads one tensor's slice at a time into the shards in place
        save_new = 4 * t["largest"] + 4 * t["largest_local"]
        resume_new = 4 * t["largest_local"]
        cells = [f"{v / GIB:.1f}" for v in (save_old, resume_old, save_new, resume_new)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nbefore, a resume on an 8-GPU node read the AdamW state 8 times over into host memory; now each tensor of "
          "a rank's shards passes through host memory once, at most the largest (the embeddings' slice)")


def main(argv=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    args = get_args(argv)
    # rank 0 holds the largest shard (FSDP2 pads dim 0 up to a multiple of the world size)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
    mesh = init_device_mesh("cpu", (args.world,))
    trained = {n: shard(build_meta(n), mesh, torch.float32) for n in CONFIGS}
    frozen = {n: shard(build_meta(n), mesh, torch.bfloat16, mp=False) for n in CONFIGS}
    print_plan(args, trained, recipe_bytes(args, trained, frozen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
