"""
The tiny world's own stages: what the embedded tiny models need before any method of the paper
can be tried on them, and nothing a real-scale user needs.

A real VLM arrives with a pretrained vision tower and a language model that can describe an
image; the tiny one starts from random weights. Three stages make it the tiny world's stand-in
for a pretrained VLM ("sees well, does not know the annotators' rubric"):

1. tower: the vision tower alone, supervised on the scene's own labels. A linear head per
   attribute reads the tower's 4 merged tokens (one per quadrant: colour, shape, offset, support)
   and their mean (noise, blur, artifacts, clutter, contrast); cross-entropy on labels known from
   how each image was drawn, fresh images every step. This is how real towers are pretrained
   (supervised or contrastive, before the language model), and it is what the tiny world lacked:
   a random frozen tower, read by the language model, misses the subtle cues (README, "The
   embedded tiny default").
2. base (sft.py --stage base --init TOWER): a fresh language model on the frozen trained tower
   learns captions and item-by-item traces whose score lines follow a generic rubric (every
   defect costs one point; data.generic_scores), not the annotators' rubric: zero-shot it reasons
   right and scores on the wrong scale, which is the room GDSO, GRPO and SFT have to learn in.
3. check: greedy traces of a checkpoint compared line by line with the world's own traces, per
   dimension and per kind of line, and its score lines against both rubrics.

The teacher and the student are built the same way at two sizes (TINY_SIZES), as the paper's
27B teacher and 9B student come from one family.

    python world.py tower --size teacher --out runs/base/tower-teacher.safetensors   # ~3 min on a CPU
    python world.py check --ckpt assets/tiny_base.safetensors --data runs/world/test.jsonl
"""

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from data import COLORS, DIMENSIONS, QUADRANTS, SEVERITIES, SHAPES, SUPPORTS

# the tiny teacher and student: same family, the student has about a third of the parameters
TINY_SIZES = {"teacher": dict(hidden=64, layers=2), "student": dict(hidden=32, layers=2)}

# -----------------------------------------------------------------------------
# scenes and their labels

# per quadrant (read from that quadrant's merged token) and per image (read from the mean token);
# an empty quadrant is class 0 of colour and shape, and has no offset or support (ignored)
QUADRANT_HEADS = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "offset": 3, "support": len(SUPPORTS)}
IMAGE_HEADS = {"noise": 3, "blur": 3, "artifacts": 3, "clutter": 3, "contrast": 2}


def random_scene(rng):
    """(scene, items): a random prompt and a candidate for it, clean, near miss or free"""
    items = data.sample_items(rng)
    kind = ("clean", "near", "free")[int(rng.choice(3, p=[0.25, 0.25, 0.5]))]
    return data._sample_defects(rng, data._sample_objects(rng, items, kind)), items


def scene_labels(scene):
    """{head: label}: per-quadrant heads get 4 labels (-100 = not applicable), image heads one"""
    by_q = {o["quadrant"]: o for o in scene["objects"]}
    out = {k: [] for k in QUADRANT_HEADS}
    for q in QUADRANTS:
        o = by_q.get(q)
        out["color"].append(0 if o is None else 1 + list(COLORS).index(o["color"]))
        out["shape"].append(0 if o is None else 1 + SHAPES.index(o["shape"]))
        out["offset"].append(-100 if o is None else o["offset"] + 1)
        out["support"].append(-100 if o is None else SUPPORTS.index(o["support"]))
    for k in ("noise", "blur", "artifacts", "clutter"):
        out[k] = SEVERITIES.index(scene[k])
    out["contrast"] = int(scene["contrast"] == "low")
    return out


def batch_of_scenes(rng, n):
    """n fresh rendered images and their labels as tensors {head: (n, 4) or (n,)}"""
    scenes = [random_scene(rng)[0] for _ in range(n)]
    labels = [scene_labels(s) for s in scenes]
    return [data.render_scene(s) for s in scenes], {k: torch.tensor([l[k] for l in labels]) for k in labels[0]}


# -----------------------------------------------------------------------------
# stage 1: the vision tower, supervised


class TowerProbe(nn.Module):
    """Linear heads on the tower's merged tokens: one per attribute."""

    def __init__(self, dim):
        super().__init__()
        self.quadrant = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in QUADRANT_HEADS.items()})
        self.image = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in IMAGE_HEADS.items()})

    def forward(self, tokens):  # tokens (B, 4, D): one merged token per quadrant, reading order
        out = {k: head(tokens) for k, head in self.quadrant.items()}  # (B, 4, n)
        out.update({k: head(tokens.mean(1)) for k, head in self.image.items()})  # (B, n)
        return out


def tower_tokens(model, images):
    """PIL images -> the tower's merged tokens (B, 4, D) as the language model receives them"""
    pixel_values, grid = model.pixels(images)
    merged = model.vision_tower()(pixel_values.to(model.vlm.dtype), grid_thw=grid).pooler_output
    return merged.view(len(images), -1, merged.shape[-1])


def probe_loss(logits, labels):
    """sum of the heads' cross-entropies, and {head: accuracy}"""
    loss, acc = 0.0, {}
    for k, lg in logits.items():
        y = labels[k]
        lg, y = lg.reshape(-1, lg.shape[-1]), y.reshape(-1)
        loss = loss + F.cross_entropy(lg, y, ignore_index=-100)
        keep = y != -100
        acc[k] = float((lg.argmax(-1)[keep] == y[keep]).float().mean())
    return loss, acc


def train_tower(model, steps=3000, batch=64, lr=2e-3, seed=0, log_every=100, eval_images=256):
    """Train model's vision tower in place on fresh scenes; -> {head: accuracy} on held-out images."""
    tower = model.vision_tower().train().requires_grad_(True)
    probe = TowerProbe(tower.merger.linear_fc2.out_features)
    params = list(tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = np.random.default_rng(seed)
    held_images, held_labels = batch_of_scenes(np.random.default_rng(seed + 10_000), eval_images)
    t0 = time.time()
    for step in range(1, steps + 1):
        for g in opt.param_groups:  # warmup 30 steps, cosine to 0.1x
            g["lr"] = lr * min(1.0, step / 30) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        images, labels = batch_of_scenes(rng, batch)
        loss, acc = probe_loss(probe(tower_tokens(model, images)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == 1:
            print(f"tower step {step:5d} | loss {loss.item():.4f} | color {acc['color']:.2f} shape {acc['shape']:.2f} "
                  f"noise {acc['noise']:.2f} clutter {acc['clutter']:.2f} | {time.time() - t0:.0f}s", flush=True)
    tower.eval()
    with torch.no_grad():
        _, acc = probe_loss(probe(tower_tokens(model, held_images)), held_labels)
    return acc


# -----------------------------------------------------------------------------
# stage 3: how well a checkpoint's traces read the image


def line_kind(dimension, line):
    """what a trace line is about: 'item' (alignment prompt item), 'extra', a defect name, or the
    per-object 'centering' / 'support' line"""
    head = line.split(":")[0]
    if head in ("noise", "blur", "artifacts", "clutter", "contrast", "extra"):
        return head
    return {"alignment": "item", "aesthetics": "centering", "plausibility": "support"}.get(dimension, head)


@torch.no_grad()
def check_traces(model, records, batch_size=32, max_new_tokens=96):
    """Greedy traces against the world's own: {dimension: {"lines", "trace", "score_true",
    "score_generic"}} and {kind of line: accuracy}. A line counts as right only if it is exactly
    the world's line at the same position; the score line is compared with both rubrics."""
    per_dim, per_kind = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    model.eval()
    for a in range(0, len(records), batch_size):
        recs = records[a:a + batch_size]
        out = model.score([r["prompt"] for r in recs], [r["image_path"] for r in recs],
                          [r["dimension"] for r in recs], mode="reasoning", max_new_tokens=max_new_tokens)
        for r, text in zip(recs, out.traces):
            items, d = data.parse_prompt(r["prompt"]), r["dimension"]
            want = data.make_trace(r["scene"], items, d).split("\n")
            got = text.strip().split("\n")
            for i, w in enumerate(want[:-1]):
                ok = i < len(got) and got[i].strip() == w
                per_dim[d]["lines"].append(ok)
                per_kind[line_kind(d, w)].append(ok)
            per_dim[d]["trace"].append([g.strip() for g in got[:-1]] == want[:-1])
            said = data.parse_score(text)
            for rubric, scores in (("true", data.true_scores), ("generic", data.generic_scores)):
                per_dim[d][f"score_{rubric}"].append(said == data.score_to_level(scores(r["scene"], items)[d]))
    table = {d: {k: float(np.mean(v)) for k, v in m.items()} for d, m in per_dim.items()}
    return table, {k: float(np.mean(v)) for k, v in sorted(per_kind.items())}


def format_check(table, kinds):
    lines = [f"{'dimension':<13} {'lines':>6} {'trace':>6} {'score (annotators)':>19} {'score (generic)':>16}"]
    for d in DIMENSIONS:
        if d in table:
            t = table[d]
            lines.append(f"{d:<13} {t['lines']:6.3f} {t['trace']:6.3f} {t['score_true']:19.3f} {t['score_generic']:16.3f}")
    lines.append("per kind of line: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the tiny world's own stages: vision tower, trace check")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tower", help="build a tiny score model and train its vision tower on fresh scenes")
    p.add_argument("--size", default="teacher", choices=sorted(TINY_SIZES), help="which tiny model")
    p.add_argument("--out", required=True, help="score-model .safetensors: trained tower, random language model")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (64 fresh images each)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and of the scene stream")
    p = sub.add_parser("check", help="compare a checkpoint's greedy traces with the world's, line by line")
    p.add_argument("--ckpt", required=True, help="score-model .safetensors")
    p.add_argument("--data", default="runs/world/test.jsonl", help="a world JSONL (records carry their scene)")
    p.add_argument("--limit", type=int, default=256, help="records to check (0 = all)")
    args = parser.parse_args()

    from model import ScoreModel

    if args.cmd == "tower":
        model = ScoreModel.tiny(seed=args.seed, **TINY_SIZES[args.size])
        torch.manual_seed(args.seed)
        acc = train_tower(model, steps=args.steps, lr=args.lr, seed=args.seed)
        print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        model.save(args.out, stage="tower", size=args.size, tower_accuracy=acc)
    else:
        records = data.load_jsonl(args.data)
        records = records[:args.limit] if args.limit else records
        model = ScoreModel.load(args.ckpt)
        print(format_check(*check_traces(model, records)))
