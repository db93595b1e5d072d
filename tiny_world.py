"""
The tiny world: everything that exists only for the embedded default, and nothing a real-scale
user needs (data.py holds the record format every script reads, model.py the score model). The
scripts reach it by this one name, `tiny_world`, where they touch the tiny world: the tiny score
model (tiny_score_model, the default --model), --data world:... (render_on_request), a record
with a scene (the count-only baseline, rationales), the tiny generator (TinyGenerator, reward_ft.py's
default), its pretraining stream and the pixel oracle. The base pretraining is tiny_base.py, a
stage on sft.py's loop.

The synthetic world. A 64x64 RGB image is a 2x2 grid of 32x32 quadrants
("top left", "top right", "bottom left", "bottom right") with at most one object per quadrant,
because with patch 16 and spatial merge 2 each quadrant is exactly one image token of the VLM:
free placement was measured not to learn at all. Every quadrant has a dark ground line; an object
(a colored circle, square, triangle, diamond or cross) normally stands on it, centered.
A prompt names 1-3 objects, e.g. "a red circle top left and a blue square bottom right".
Each prompt gets C candidates: one clean, one same-count near miss (an object of the right count
with the wrong color or shape, so that counting objects cannot rank them), the rest random.
Defects, and the true score of each dimension (all clipped to [1, 5], on the half-point grid):
  alignment    = 5 - 1.5 per wrong color or wrong shape - 2 per object wrong in both or missing
                   - 1.5 per object moved to another (unprompted) quadrant - 1 per extra object
  realism      = 5 - sum over noise, blur, blocky artifacts of (none 0, mild 1, strong 2.5)
  aesthetics   = 5 - 1 per off-center object - clutter (none 0, mild 0.5, strong 2) - 1.5 if low contrast
  plausibility = 5 - per object (grounded 0, hovering 0.5, floating 2, sunk into the ground 1.5)
"Sunk" is the interpenetration defect: the ground line runs through the object. (Two objects
overlapping would break the one-object-per-quadrant rule that makes the world learnable.)
Simulated annotators add Gaussian noise (sd 0.5, and 3x that for one annotation in ten) to the
true score and round to the grid; the half-point penalties (mild clutter, hovering) make subtle
pairs that noisy labels often order wrongly, as in real preference data.
The teacher's reasoning trace for a dimension has one short line per item (prompt items for
alignment, drawn objects for aesthetics and plausibility, defect kinds for realism) and ends
with "Score: d", d = score_to_level(true score), e.g. for alignment:
  top left red circle: red circle, yes.
  bottom right blue square: green square, no.
  extra: none.
  Score: 6
An alignment line says what the quadrant holds before its verdict, so that the verdict compares
two phrases already written. The tiny bases' pretraining world (--trace-rubric generic) ends its
traces on a generic rubric instead, generic_scores: every defect one point, whatever its kind
(--trace-rubric conspicuous: the same with the mild defects free, conspicuous_scores; coarse: also
extra and off-center objects free, coarse_scores).

make_world writes the labeled world as records of data.py's format, each also carrying its scene,
caption and trace; generator_batch is the same distribution rendered on the fly, the tiny
generator's pretraining stream (reward_ft.py --stage pretrain). The oracle (estimate_scene,
oracle_scores) reads a scene back from the pixels of any 64x64 image, without learning: the
blind judge of reward_ft.py.

The tiny models. tiny_world.tiny_score_model() builds a Qwen3.5-architecture VLM from tiny_config, with a
byte-level BPE tokenizer made in code whose merges make the world's words single tokens
(build_tiny_tokenizer) and Qwen's image processor at 64x64 (tiny_image_processor). A real VLM
arrives with a pretrained vision tower and a language model that can describe an image; the tiny
one starts from random weights. Three stages make it the tiny world's stand-in for a pretrained
VLM ("sees well, does not know the annotators' rubric"):

1. tower: the vision tower alone, supervised on the scene's own labels. A linear head per
   attribute reads the tower's 4 merged tokens (one per quadrant: colour, shape, offset, support)
   and their mean (noise, blur, artifacts, clutter, contrast); cross-entropy on labels known from
   how each image was drawn, fresh images every step. This is how real towers are pretrained
   (supervised or contrastive, before the language model), and it is what the tiny world lacked:
   a random frozen tower, read by the language model, misses the subtle cues (docs/LOG.md).
2. base (tiny_base.py --init TOWER): a fresh language model on the frozen trained tower
   learns captions and item-by-item traces whose score lines follow a generic rubric (every
   defect costs one point; generic_scores), not the annotators' rubric: zero-shot it reasons
   right and scores on the wrong scale, which is the room GDSO, GRPO and SFT have to learn in.
   The shipped bases (make base) do this on prompts v1, the image first. Bases on prompts v2 and
   v3 that also learn one-token answers were built and measured, not shipped (docs/LOG.md).
3. check: greedy traces of a checkpoint compared line by line with the world's own traces, per
   dimension and per kind of line, and its score lines against both rubrics; then HPA of its own
   score beside that of its lines priced by the annotators' rubric (rubric_on_lines), which
   separates what it reads from the scale it scores on.

The teacher and the student are built the same way at two sizes (TINY_SIZES), as the paper's
27B teacher and 9B student come from one family.

    python tiny_world.py render --out runs/world --n 200 --seed 0                         # the labeled world
    python tiny_world.py render --out runs/pretrain --n 4000 --seed 1 --trace-rubric generic --test-frac 0.02
    python tiny_world.py tower --size teacher --out runs/base/tower-teacher.safetensors   # ~3 min on a CPU
    python tiny_world.py check --ckpt assets/tiny_base.safetensors --data runs/world/test.jsonl
"""

import argparse
import copy
import functools
import json
import math
import os
import re
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from tokenizers import Tokenizer
from transformers import Qwen3_5ForConditionalGeneration

from data import (DIMENSIONS, S_MAX, S_MIN, SCORE_MARKER, aggregate, load_jsonl, parse_score, score_to_level,
                  table_from_predictions)
from model import (GENERATOR_FORMAT, INSTRUCTIONS, PROMPT_VERSION, PROMPT_VERSIONS, RUBRICS, ScoreModel, params_on_meta,
                   read_checkpoint)


# -----------------------------------------------------------------------------
# vocabulary and scenes

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
          "yellow": (235, 200, 20), "purple": (150, 50, 190)}
SEVERITIES = ("none", "mild", "strong")
SUPPORTS = ("grounded", "hovering", "floating", "sunk")
LIFT = {"grounded": 0, "hovering": 4, "floating": 10, "sunk": -6}  # pixels above the ground
BACKGROUND, GROUND = (225, 225, 215), (70, 70, 70)
SIZE, SHIFT = 14, 8  # object box side, and the horizontal shift of an off-center object
# penalties behind the true scores (see the module docstring)
ALIGN_PENALTY = {"ok": 0.0, "color": 1.5, "shape": 1.5, "both": 2.0, "missing": 2.0, "moved": 1.5}
EXTRA_PENALTY, OFFCENTER_PENALTY, LOW_CONTRAST_PENALTY = 1.0, 1.0, 1.5
REALISM_PENALTY = {"none": 0.0, "mild": 1.0, "strong": 2.5}
CLUTTER_PENALTY = {"none": 0.0, "mild": 0.5, "strong": 2.0}
SUPPORT_PENALTY = {"grounded": 0.0, "hovering": 0.5, "floating": 2.0, "sunk": 1.5}
# the words of the templates below (+ DIMENSIONS, which the rubric prompts use)
_TEMPLATE_WORDS = "a and yes no empty at extra none noise blur artifacts clutter contrast normal low " \
                  "centered off center " + SCORE_MARKER.rstrip(":")
VOCAB = sorted(set(" ".join([*QUADRANTS, *SHAPES, *COLORS, *SEVERITIES, *SUPPORTS, *DIMENSIONS,
                             _TEMPLATE_WORDS]).split()))


def prompt_text(items):
    parts = [f"a {it['color']} {it['shape']} {it['quadrant']}" for it in items]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_ITEM_RE = re.compile(r"a (\w+) (\w+) ((?:top|bottom) (?:left|right))")


def parse_prompt(prompt):
    """prompt text -> items [{"quadrant", "color", "shape"}] (inverse of prompt_text)"""
    return [{"quadrant": q, "color": c, "shape": s} for c, s, q in _ITEM_RE.findall(prompt)]


def _name(o):
    return f"{o['quadrant']} {o['color']} {o['shape']}"


# -----------------------------------------------------------------------------
# the rubric behind the labels: true and generic scores, captions and traces

def check_alignment(scene, items):
    """per prompt item (status, what is there instead) and the list of extra objects"""
    by_q = {o["quadrant"]: o for o in scene["objects"]}
    prompted = {it["quadrant"] for it in items}
    spare = [o for o in scene["objects"] if o["quadrant"] not in prompted]
    result = []
    for it in items:
        o = by_q.get(it["quadrant"])
        if o is not None:
            wrong = (o["color"] != it["color"], o["shape"] != it["shape"])
            status = {(0, 0): "ok", (1, 0): "color", (0, 1): "shape", (1, 1): "both"}[wrong]
            result.append((status, o))
            continue
        # a missing item whose exact object stands in an unprompted quadrant was moved there
        same = [s for s in spare if (s["color"], s["shape"]) == (it["color"], it["shape"])]
        if same:
            spare.remove(same[0])
        result.append(("moved", same[0]) if same else ("missing", None))
    return result, spare


def true_scores(scene, items):
    """{dimension: true score} from how the scene was drawn (formulas in the module docstring)"""
    status, extras = check_alignment(scene, items)
    objs = scene["objects"]
    penalty = {
        "alignment": sum(ALIGN_PENALTY[s] for s, _ in status) + EXTRA_PENALTY * len(extras),
        "realism": sum(REALISM_PENALTY[scene[k]] for k in ("noise", "blur", "artifacts")),
        "aesthetics": OFFCENTER_PENALTY * sum(o["offset"] != 0 for o in objs)
        + CLUTTER_PENALTY[scene["clutter"]] + LOW_CONTRAST_PENALTY * (scene["contrast"] == "low"),
        "plausibility": sum(SUPPORT_PENALTY[o["support"]] for o in objs),
    }
    return {d: max(S_MIN, S_MAX - float(penalty[d])) for d in DIMENSIONS}


# the mild defects, which the conspicuous rubric does not count: a mild noise, blur, artifacts or
# clutter, and an object hovering just above the ground (the annotators' cheapest non-zero penalties)
MILD = {"realism": {"mild"}, "clutter": {"mild"}, "support": {"hovering"}}
# what each generic rubric leaves out: "mild" (the MILD defects), "extra" (objects the prompt did not
# ask for), "offcenter" (an object off its quadrant's center). Every other defect costs one point
FREE = {"generic": (), "conspicuous": ("mild",), "coarse": ("mild", "extra", "offcenter")}


def _free(kind, severity, free):
    """whether a generic rubric that leaves out `free` (a value of FREE) prices this defect at nothing;
    kind and severity in rubric_on_lines' vocabulary (_line_defects)"""
    return kind in free or ("mild" in free and severity in MILD.get(kind, ()))


def defect_counts(scene, items, free=()):
    """{dimension: number of defects}, every kind and severity counted once (the generic rubric);
    free: the kinds of FREE left out (FREE["conspicuous"], FREE["coarse"])"""
    unknown = set(free) - {"mild", *_PRICES}
    if unknown:
        raise ValueError(f"free names mild or a defect kind of {sorted(_PRICES)}; got {sorted(unknown)}")
    status, extras = check_alignment(scene, items)
    objs = scene["objects"]
    counted = lambda kind, severity=None: not _free(kind, severity, free)  # noqa: E731
    return {
        "alignment": sum(s != "ok" and counted("align", s) for s, _ in status)
        + sum(counted("extra") for _ in extras),
        "realism": sum(scene[k] != "none" and counted("realism", scene[k])
                       for k in ("noise", "blur", "artifacts")),
        "aesthetics": sum(o["offset"] != 0 and counted("offcenter") for o in objs)
        + (scene["clutter"] != "none" and counted("clutter", scene["clutter"]))
        + (scene["contrast"] == "low" and counted("contrast")),
        "plausibility": sum(o["support"] != "grounded" and counted("support", o["support"])
                            for o in objs),
    }


def _one_point_each(scene, items, rubric):
    return {d: max(S_MIN, S_MAX - float(n)) for d, n in defect_counts(scene, items, FREE[rubric]).items()}


def generic_scores(scene, items):
    """{dimension: score} on a generic rubric that is not the annotators': every defect costs one
    point, whatever its kind or severity (max(1, 5 - defects)). The tiny base is pretrained on
    traces that end on this scale, so that zero-shot it reasons right but scores on the wrong scale,
    as a pretrained VLM does before it learns a rubric."""
    return _one_point_each(scene, items, "generic")


def conspicuous_scores(scene, items):
    """{dimension: score} on a generic rubric further from the annotators': every defect one point,
    as generic_scores, except that the MILD ones cost nothing (a rater who notices only what is
    plain to see). The traces still name every defect; only their score lines leave the mild ones
    out, so a model pretrained on them reads a mild blur and scores as if it were not there."""
    return _one_point_each(scene, items, "conspicuous")


def coarse_scores(scene, items):
    """{dimension: score} on a generic rubric further still: conspicuous_scores, and also objects
    the prompt did not ask for and objects off their quadrant's center cost nothing (a rater who
    checks that what was asked for is there, not what else is there or where exactly it sits)."""
    return _one_point_each(scene, items, "coarse")


# the scales a world's traces can end on (render --trace-rubric), and tiny_world.py check's --rubric
TRACE_RUBRICS = {"true": true_scores, "generic": generic_scores, "conspicuous": conspicuous_scores,
                 "coarse": coarse_scores}


def make_caption(scene, detail=False):
    """what is in each quadrant; detail=True adds placement and the image-level defects"""
    by_q = {o["quadrant"]: o for o in scene["objects"]}
    parts = []
    for q in QUADRANTS:
        o = by_q.get(q)
        if o is None:
            parts.append(f"{q}: empty.")
        elif detail:
            where = "centered" if o["offset"] == 0 else "off center"
            parts.append(f"{q}: {o['color']} {o['shape']}, {where}, {o['support']}.")
        else:
            parts.append(f"{q}: {o['color']} {o['shape']}.")
    if detail:
        parts += [f"{k}: {scene[k]}." for k in ("noise", "blur", "artifacts", "clutter", "contrast")]
    return " ".join(parts)


def make_trace(scene, items, dimension, level=None):
    """the teacher's item-by-item reasoning for one dimension, ending with 'Score: level'"""
    if level is None:
        level = score_to_level(true_scores(scene, items)[dimension])
    if dimension == "alignment":
        status, extras = check_alignment(scene, items)
        lines = []
        for it, (s, o) in zip(items, status):
            # what the quadrant holds first, then the verdict: reading before judging makes the
            # comparison one of two phrases already written (docs/TINY_WORLD.md)
            seen = "empty" if s in ("missing", "moved") else f"{o['color']} {o['shape']}"
            verdict = "yes" if s == "ok" else f"at {o['quadrant']}" if s == "moved" else "no"
            lines.append(f"{_name(it)}: {seen}, {verdict}.")
        lines.append("extra: " + (", ".join(_name(o) for o in extras) or "none") + ".")
    elif dimension == "realism":
        lines = [f"{k}: {scene[k]}." for k in ("noise", "blur", "artifacts")]
    elif dimension == "aesthetics":
        lines = [f"{_name(o)}: {'centered' if o['offset'] == 0 else 'off center'}."
                 for o in scene["objects"]]
        lines += [f"clutter: {scene['clutter']}.", f"contrast: {scene['contrast']}."]
    elif dimension == "plausibility":
        lines = [f"{_name(o)}: {o['support']}." for o in scene["objects"]]
    else:
        raise ValueError(f"unknown dimension {dimension!r}")
    return "\n".join(lines + [f"{SCORE_MARKER} {level}"])


def _line_defects(dimension, line, items):
    """What one trace line says is wrong, as (kind, severity) pairs that rubric_on_lines prices."""
    head, _, said = line.strip().rstrip(".").partition(": ")
    if head == "extra":
        return [] if said in ("none", "") else [("extra", None)] * len(said.split(", "))
    if dimension == "alignment":
        seen, _, verdict = said.rpartition(", ")
        if verdict in ("yes", ""):
            return []
        if verdict.startswith("at "):
            return [("align", "moved")]
        item = next((it for it in items if _name(it) == head), None)
        if seen == "empty" or item is None:
            return [("align", "missing")]
        color, _, shape = seen.partition(" ")
        wrong = (color != item["color"], shape != item["shape"])  # a "no" that reads the item right: both
        return [("align", {(1, 0): "color", (0, 1): "shape"}.get(wrong, "both"))]
    if head in ("noise", "blur", "artifacts"):
        return [("realism", said)] if said in ("mild", "strong") else []
    if head == "clutter":
        return [("clutter", said)] if said in ("mild", "strong") else []
    if head == "contrast":
        return [("contrast", None)] if said == "low" else []
    if dimension == "aesthetics":
        return [("offcenter", None)] if said == "off center" else []
    if dimension == "plausibility":
        return [("support", said)] if said in ("hovering", "floating", "sunk") else []
    return []


_PRICES = {"align": ALIGN_PENALTY, "realism": REALISM_PENALTY, "clutter": CLUTTER_PENALTY,
           "support": SUPPORT_PENALTY, "extra": EXTRA_PENALTY, "offcenter": OFFCENTER_PENALTY,
           "contrast": LOW_CONTRAST_PENALTY}


def rubric_on_lines(trace, dimension, items, rubric="true"):
    """The score a rubric gives to what a trace's lines say, not to the scene: each line read back
    as the defects it names, priced by the annotators' penalties (rubric="true", as true_scores) or
    one point each, less what FREE leaves out ("generic", "conspicuous", "coarse": as generic_scores,
    conspicuous_scores, coarse_scores). On the world's own traces this is the scene's score; on a
    checkpoint's, it is what a score line calibrated to that rubric would say after those lines,
    which separates the model's reading from its scale (tiny_world.py check). A line
    that names nothing known costs nothing; the score line itself is not read."""
    if rubric not in TRACE_RUBRICS:
        raise ValueError(f"rubric must be one of {', '.join(TRACE_RUBRICS)}, got {rubric!r}")
    penalty = 0.0
    for line in trace.strip().split("\n"):
        if line.strip().startswith(SCORE_MARKER):
            continue
        for kind, severity in _line_defects(dimension, line, items):
            price = _PRICES[kind]
            if rubric == "true":
                penalty += float(price[severity] if isinstance(price, dict) else price)
            elif not _free(kind, severity, FREE[rubric]):
                penalty += 1.0
    return max(S_MIN, S_MAX - penalty)


# -----------------------------------------------------------------------------
# rendering

def _draw_object(draw, o):
    q = QUADRANTS.index(o["quadrant"])
    x0 = 32 * (q % 2) + (32 - SIZE) // 2 + SHIFT * o["offset"]
    y0 = 32 * (q // 2) + 26 - SIZE - LIFT[o["support"]]  # grounded: bottom row touches the ground
    x1, y1, cx, cy = x0 + SIZE - 1, y0 + SIZE - 1, x0 + SIZE // 2, y0 + SIZE // 2
    fill = COLORS[o["color"]]
    if o["shape"] == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif o["shape"] == "square":  # inset by one pixel so its area is close to the circle's
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=fill)
    elif o["shape"] == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif o["shape"] == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif o["shape"] == "cross":
        draw.rectangle([x0, cy - 2, x1, cy + 2], fill=fill)
        draw.rectangle([cx - 2, y0, cx + 2, y1], fill=fill)


def render_scene(scene):
    """scene dict -> 64x64 RGB PIL image; deterministic (the noise comes from scene["seed"])"""
    rng = np.random.default_rng(scene["seed"])
    img = Image.new("RGB", (64, 64), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        _draw_object(draw, o)
    for q in range(4):  # ground lines after the objects, so they run through a sunk object
        x, y = 32 * (q % 2), 32 * (q // 2)
        draw.rectangle([x + 1, y + 26, x + 30, y + 27], fill=GROUND)
    n_junk = {"none": 0, "mild": 8, "strong": 24}[scene["clutter"]]
    for x, y in rng.integers(0, 63, size=(n_junk, 2)):  # clutter: 2x2 dark specks anywhere
        draw.rectangle([int(x), int(y), int(x) + 1, int(y) + 1], fill=(90, 60, 30))
    if scene["contrast"] == "low":  # wash everything toward mid gray
        img = Image.fromarray((128 + 0.4 * (np.asarray(img, np.float32) - 128)).astype(np.uint8))
    # realism defects, in capture order: optics (blur), sensor (noise), compression (blocks)
    radius = {"none": 0.0, "mild": 0.8, "strong": 1.6}[scene["blur"]]
    if radius:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    x = np.asarray(img, np.float32)
    sd = {"none": 0.0, "mild": 9.0, "strong": 22.0}[scene["noise"]]
    if sd:
        x = x + rng.normal(0.0, sd, x.shape)
    amp = {"none": 0.0, "mild": 8.0, "strong": 24.0}[scene["artifacts"]]
    if amp:  # blocky compression: an offset per 8x8 block and channel, then coarse quantization
        x = x + np.kron(rng.uniform(-amp, amp, (8, 8, 3)), np.ones((8, 8, 1)))
        step = 16.0 if scene["artifacts"] == "mild" else 40.0
        x = np.floor(x / step + 0.5) * step
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))


# -----------------------------------------------------------------------------
# the labeled world: prompts, candidates and annotators, make_world and its CLI (tiny_world.py render),
# and the same draws as a stream for the tiny generator

def _pick(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


ITEMS_P = (0.3, 0.4, 0.3)  # how often a prompt names one, two or three objects


def check_items_p(items_p):
    """A ValueError unless items_p is three chances (one, two, three items) that sum to 1."""
    if len(items_p) != 3 or min(items_p) < 0 or abs(sum(items_p) - 1) > 1e-6:
        raise ValueError(f"items_p must be three chances (one, two, three items) that sum to 1, got {items_p}")


def sample_items(rng, items_p=ITEMS_P):
    n = int(rng.choice([1, 2, 3], p=list(items_p)))
    quads = sorted(int(q) for q in rng.choice(4, size=n, replace=False))  # prompts in reading order
    return [{"quadrant": QUADRANTS[q], "color": _pick(rng, list(COLORS)), "shape": _pick(rng, SHAPES)}
            for q in quads]


def _sample_objects(rng, items, kind):
    # kind: "clean" (as prompted), "near" (same count, 1-2 wrong attributes) or "free"
    free = [q for q in QUADRANTS if q not in {it["quadrant"] for it in items}]
    n_wrong = 2 if len(items) > 1 and rng.random() < 0.3 else 1  # near misses: 1 or 2 wrong items
    wrong = set(rng.choice(len(items), size=n_wrong, replace=False))
    objects = []
    for i, it in enumerate(items):
        if kind == "clean":
            status = "ok"
        elif kind == "near":
            status = _pick(rng, ("color", "shape")) if i in wrong else "ok"
        else:
            status = _pick(rng, ("ok", "color", "shape", "both", "missing", "moved"),
                           p=[0.4, 0.15, 0.15, 0.05, 0.125, 0.125])
        o = dict(it)
        if status in ("color", "both"):
            o["color"] = _pick(rng, [c for c in COLORS if c != it["color"]])
        if status in ("shape", "both"):
            o["shape"] = _pick(rng, [s for s in SHAPES if s != it["shape"]])
        if status == "moved" and free:
            o["quadrant"] = free.pop(int(rng.integers(len(free))))
        if status != "missing" or (i == len(items) - 1 and not objects):  # never an empty image
            objects.append(o)
    for q in free if kind == "free" else []:
        if rng.random() < 0.25:  # an extra, unprompted object
            objects.append({"quadrant": q, "color": _pick(rng, list(COLORS)), "shape": _pick(rng, SHAPES)})
    return sorted(objects, key=lambda o: QUADRANTS.index(o["quadrant"]))


def _sample_defects(rng, objects):
    # the non-alignment defects, each drawn independently of the alignment errors
    scene = {"objects": [dict(o, offset=int(rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15])),
                              support=_pick(rng, SUPPORTS, p=[0.6, 0.15, 0.12, 0.13]))
                         for o in objects]}
    kinds = set(rng.choice(3, size=int(rng.choice(4, p=[0.35, 0.4, 0.2, 0.05])), replace=False))
    for k, name in enumerate(("noise", "blur", "artifacts")):
        scene[name] = _pick(rng, ("mild", "strong"), p=[0.6, 0.4]) if k in kinds else "none"
    scene["clutter"] = _pick(rng, SEVERITIES, p=[0.65, 0.2, 0.15])
    scene["contrast"] = "low" if rng.random() < 0.25 else "normal"
    scene["seed"] = int(rng.integers(2**31))
    return scene


def sample_candidates(rng, items, n):
    """n scenes for one prompt: one clean, one same-count near miss, the rest free"""
    kinds = (["clean", "near"] + ["free"] * n)[:n]
    scenes = [_sample_defects(rng, _sample_objects(rng, items, k)) for k in kinds]
    for _ in range(20):  # redraw defects until every dimension has at least two distinct scores
        truth = [true_scores(s, items) for s in scenes]
        if n < 2 or all(len({t[d] for t in truth}) > 1 for d in DIMENSIONS):
            break
        j = int(rng.integers(n))
        scenes[j] = _sample_defects(rng, scenes[j]["objects"])
    return [scenes[int(j)] for j in rng.permutation(n)]  # the clean one is not always first


def annotate(rng, truth, n, noise=0.5):
    """n simulated annotations: truth + Gaussian noise (sometimes 3x wider), rounded to the grid"""
    sd = noise * np.where(rng.random(n) < 0.1, 3.0, 1.0)
    raw = truth + sd * rng.normal(size=n)
    return [float(np.clip(np.floor(2 * x + 0.5) / 2, S_MIN, S_MAX)) for x in raw]


def make_world(out, n, seed=0, candidates=4, annotators=5, test_frac=0.2, noise=0.5, trace_rubric="true",
               items_p=ITEMS_P, repeat_prompts=False, exclude=()):
    """render n prompts x candidates images and write out/{train,test}.jsonl; returns the records.
    trace_rubric: the scale the records' traces end on, one of TRACE_RUBRICS: "true" (the annotators'
    rubric), "generic", "conspicuous" or "coarse" (generic_scores, conspicuous_scores, coarse_scores:
    the tiny bases' pretraining worlds). items_p: the chance of one, two or three
    prompt items. repeat_prompts: a prompt may be drawn again (there are only 100 one-item prompts;
    the base's pretraining worlds want thousands); train and test still share none, the split is
    by prompt text. exclude: prompt texts never drawn (another world's test prompts: a world of unlabeled
    records for RISD that shares no prompt with the labeled world's test split)."""
    if trace_rubric not in TRACE_RUBRICS:
        raise ValueError(f"trace_rubric must be one of {', '.join(TRACE_RUBRICS)}, got {trace_rubric!r}")
    check_items_p(items_p)
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    prompts, texts = [], {}  # texts: prompt text -> order of first appearance
    while len(prompts) < n:  # distinct prompts unless repeat_prompts
        items = sample_items(rng, items_p)
        text = prompt_text(items)
        if text in exclude:
            continue
        if repeat_prompts or text not in texts:
            texts.setdefault(text, len(texts))
            prompts.append(items)
    distinct = len(texts)
    n_test = min(distinct - 1, round(distinct * test_frac)) if distinct > 1 and test_frac > 0 else 0
    files = {split: open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8")
             for split in ("train", "test")}
    records = []
    for p, items in enumerate(prompts):
        split, group = ("test" if texts[prompt_text(items)] >= distinct - n_test else "train"), f"p{p:05d}"
        for c, scene in enumerate(sample_candidates(rng, items, candidates)):
            image = f"images/{group}_c{c}.png"
            render_scene(scene).save(os.path.join(out, image))
            truth, caption = true_scores(scene, items), make_caption(scene)
            traced = TRACE_RUBRICS[trace_rubric](scene, items)
            for d in DIMENSIONS:
                scores = annotate(rng, truth[d], annotators, noise)
                r = {"id": f"{group}_c{c}_{d}", "prompt": prompt_text(items), "image": image,
                     "dimension": d, "scores": scores, "score": aggregate(scores),
                     "true_score": truth[d], "group": group, "split": split, "caption": caption,
                     "trace": make_trace(scene, items, d, score_to_level(traced[d])),
                     "scene": scene}
                files[split].write(json.dumps(r) + "\n")
                records.append(r)
    for f in files.values():
        f.close()
    return records


def render_on_request(spec, write=True, log=print):
    """--data world:n=N,seed=S[,dir=FOLDER] of every script: the folder of that world, rendered unless
    the same request rendered it there before (default dir runs/world-nN-seedS). Under torchrun only
    rank 0 writes (write=True); the others get the folder and wait at the caller's barrier. A bad
    spec, or a folder that holds other data, is a ValueError."""
    opts = {"n": "200", "seed": "0", "dir": ""}
    for kv in filter(None, spec.partition(":")[2].split(",")):
        k, _, v = kv.partition("=")
        if k not in opts or not v:
            raise ValueError(f"--data {spec}: expected world:n=N,seed=S[,dir=FOLDER], got {kv!r}")
        opts[k] = v
    try:
        n, seed = int(opts["n"]), int(opts["seed"])
    except ValueError:
        raise ValueError(f"--data {spec}: n and seed must be integers") from None
    folder = opts["dir"] or f"runs/world-n{n}-seed{seed}"
    if not write:
        return folder
    stamp, want = os.path.join(folder, "world.json"), {"n": n, "seed": seed}
    if os.path.exists(stamp):  # rendered before by this same request: reuse it
        with open(stamp) as f:
            have = json.load(f)
        if have != want:
            raise ValueError(f"--data {spec}: {folder} holds a world rendered with {have}; pick another dir=")
        return folder
    if os.path.exists(os.path.join(folder, "train.jsonl")):
        raise ValueError(f"--data {spec}: {folder} already holds data that --data world did not render; "
                         "pick another dir=")
    log(f"rendering the synthetic world into {folder} (n={n}, seed={seed})")
    make_world(folder, n=n, seed=seed)
    # the stamp last: a render cut short is not mistaken for a finished one
    with open(stamp + ".tmp", "w") as f:
        json.dump(want, f)
    os.replace(stamp + ".tmp", stamp)
    return folder


def count_only_predictions(records):
    """The shortcut baseline: mu = 5 - |objects drawn - objects named in the prompt| (synthetic world)."""
    mu = np.array([5.0 - abs(len(r["scene"]["objects"]) - len(parse_prompt(r["prompt"]))) for r in records])
    n = len(records)
    return {"mu": mu, "sigma": np.zeros(n), "n_tokens": np.zeros(n), "valid": np.ones(n, dtype=bool)}


def render(args):
    """python tiny_world.py render: make_world with the CLI's options, and one line about what it wrote."""
    t0 = time.time()
    exclude = ()
    if args.holdout:
        try:
            exclude = {r["prompt"] for r in load_jsonl(args.holdout, labeled=False)}
        except (OSError, ValueError) as e:
            print(f"error: --holdout {args.holdout}: {e}", file=sys.stderr)
            sys.exit(2)
    records = make_world(args.out, args.n, args.seed, args.candidates, args.annotators, args.test_frac,
                         args.noise, args.trace_rubric, args.items_p, args.repeat_prompts, exclude)
    n_train = sum(r["split"] == "train" for r in records)
    print(f"{len(records)} records ({n_train} train, {len(records) - n_train} test), "
          f"{len(records) // len(DIMENSIONS)} images in {args.out} | {time.time() - t0:.1f}s")


def generator_batch(rng, n, exclude, clean=False):
    """n (prompt, image) pairs drawn as make_world draws them, never with a prompt in `exclude`: the
    tiny generator's pretraining stream (reward_ft.py --stage pretrain)."""
    prompts, images = [], []
    while len(prompts) < n:
        items = sample_items(rng)
        text = prompt_text(items)
        if text in exclude:
            continue
        scenes = sample_candidates(rng, items, 4)
        if clean:  # the candidates whose objects are exactly the prompt's (at least the clean one)
            scenes = [s for s in scenes if true_scores(s, items)["alignment"] == S_MAX]
        scene = scenes[int(rng.integers(len(scenes)))]
        prompts.append(text)
        images.append(np.asarray(render_scene(scene), np.float32) / 255)
    return prompts, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (n, 3, 64, 64) in [0, 1]


# -----------------------------------------------------------------------------
# the image-reading oracle: the world's scores read back from the pixels of any 64x64 image

# Thresholds of the estimates below, set on rendered world images; agreement with true_scores on
# 1,200 renders: alignment .98, realism 1.00, aesthetics .95, plausibility .99 (tests/test_reward_ft.py)
ORACLE = {
    "contrast_lum": 195.0,  # median luminance below this: the low-contrast wash
    "noise": {"none": (3.5, 12.0), "mild": (4.0, 12.5), "strong": (8.0, 14.5)},  # mild / strong, by artifacts
    "blur": (0.15, 0.45),  # ground-line bleed: mild / strong
    "min_pixels": 25, "min_chroma": 60.0,  # an object: this many saturated pixels of one color ...
    "max_off_line": 60.0, "off_line_artifacts": {"none": 0.0, "mild": 25.0, "strong": 50.0},
    "min_dice": 0.4,  # ... shaped like one of the world's objects
    "speck_dark": 15.0, "speck_artifacts": {"none": 0.0, "mild": 20.0, "strong": 45.0},
    "clutter": (12, 130),  # dark speck pixels: mild / strong
}
# the pixel classes: background, ground line, clutter speck and grays between them (a blurred line),
# then the object colors
_PLAIN_RGB = [BACKGROUND, GROUND, (90, 60, 30)] + [(g, g, g - 3) for g in (110, 150, 190)]
_CLASS_RGB = np.array([*_PLAIN_RGB, *COLORS.values()], np.float32)
_N_PLAIN = len(_PLAIN_RGB)  # classes before the object colors
_TEMPLATES = None


def _templates(blur="none"):
    """{(shape, offset, support): (32, 32) coverage in [0, 1] of the object in the top-left quadrant},
    after the given blur (a strongly blurred cross looks like a diamond when compared sharp)"""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = {}
    if blur not in _TEMPLATES:
        radius = {"none": 0.0, "mild": 0.8, "strong": 1.6}[blur]
        out = {}
        for shape in SHAPES:
            for offset in (-1, 0, 1):
                for support in SUPPORTS:
                    img = Image.new("RGB", (32, 32), (0, 0, 0))
                    _draw_object(ImageDraw.Draw(img), {"quadrant": "top left", "color": "red", "shape": shape,
                                                        "offset": offset, "support": support})
                    img = img.filter(ImageFilter.GaussianBlur(radius)) if radius else img
                    out[(shape, offset, support)] = np.asarray(img, np.float32)[:, :, 0] / COLORS["red"][0]
        _TEMPLATES[blur] = out
    return _TEMPLATES[blur]


def _box3(x):
    """3x3 mean over the two leading axes (edge-padded)"""
    p = np.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    return sum(p[i:i + x.shape[0], j:j + x.shape[1]] for i in range(3) for j in range(3)) / 9


def _median3(x):
    """3x3 median per channel (edge-padded)"""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(0, 1))  # (H, W, C, 3, 3)
    return np.median(win.reshape(*x.shape, 9), -1)


def estimate_scene(image):
    """A 64x64 RGB image (PIL or uint8 array) -> the scene dict that render_scene would have drawn.

    Simple image analysis, no learning, so it shares nothing with any score model: the contrast from
    the background's brightness; blocky artifacts from the quantization of the values, noise from a
    robust high-pass, blur from how far the ground line bleeds into the row below it; per quadrant
    the dominant saturated color (nearest of the world's colors, on a median-filtered image), then
    shape, offset and support by the template of _draw_object (blurred like the image) that best
    matches the color's coverage; clutter from dark specks away from objects and ground lines.
    Works on any 64x64 image, a generator's included: a smeared blob is no object, and a wrong
    color, shape, place or support is read as such.
    """
    raw = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    if raw.shape != (64, 64, 3):
        raise ValueError(f"the oracle reads 64x64 RGB images, got {raw.shape}")
    lum = raw.mean(-1)
    scene = {"contrast": "low" if np.median(lum) < ORACLE["contrast_lum"] else "normal"}
    wash = 0.4 if scene["contrast"] == "low" else 1.0  # render_scene's low-contrast wash toward gray
    palette = 128 + wash * (_CLASS_RGB - 128)
    # realism: quantized values betray the blocky artifacts; noise is the high-pass left after them
    v = raw.astype(np.int64).ravel()
    on = lambda step: np.mean((v % step == 0) | (v == 255))
    scene["artifacts"] = "strong" if on(40) > 0.95 else "mild" if on(16) > 0.95 else "none"
    hp = np.abs(raw - _box3(raw)).mean(-1)
    noise = float(np.median(hp))
    t = ORACLE["noise"][scene["artifacts"]]
    scene["noise"] = "strong" if noise > t[1] else "mild" if noise > t[0] else "none"
    # blur: the ground line's bleed into the row below it, relative to the line's depth
    cols = np.r_[3:29, 35:61]
    below, line, bg = (np.median(lum[[r, r + 32]][:, cols]) for r in (28, 27, 30))
    bleed = float((bg - below) / max(bg - line, 1.0))
    t = ORACLE["blur"]
    scene["blur"] = "strong" if bleed > t[1] else "mild" if bleed > t[0] else "none"
    # pixel classes on a median-filtered image (noise and specks gone), objects per quadrant
    sm = _median3(raw)
    cls = ((sm[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)  # (64, 64)
    # object colors are saturated: a grayish pixel (background shifted by blocky artifacts) is none
    cls[(sm.max(-1) - sm.min(-1)) < ORACLE["min_chroma"] * wash] = 0
    objects, taken = [], np.zeros((64, 64), bool)
    rows = np.ones(32, bool)
    rows[26:28] = False  # the ground line hides what is under it: not compared
    for q, name in enumerate(QUADRANTS):
        y0, x0 = 32 * (q // 2), 32 * (q % 2)
        c = cls[y0:y0 + 32, x0:x0 + 32]
        counts = np.bincount(c.ravel(), minlength=len(_CLASS_RGB))[_N_PLAIN:]
        if counts.max() < ORACLE["min_pixels"]:
            continue
        k = int(counts.argmax())
        # coverage: where each pixel lies between the background and the object color (a blend is
        # partial coverage); pixels far off that line (ground, specks) cover nothing
        bg, col = palette[0], palette[_N_PLAIN + k]
        d = sm[y0:y0 + 32, x0:x0 + 32] - bg
        f = (d @ (col - bg)) / ((col - bg) @ (col - bg))
        off = np.linalg.norm(d - f[:, :, None] * (col - bg), axis=-1)
        tol = max(ORACLE["max_off_line"] * wash, ORACLE["off_line_artifacts"][scene["artifacts"]])
        cover = np.where(off < tol, f.clip(0, 1), 0.0)[rows]
        # shape, offset and support: the template of render_scene (at the estimated blur) that
        # overlaps best, by soft Dice
        dice = {key: 2 * (cover * t[rows]).sum() / ((cover ** 2).sum() + (t[rows] ** 2).sum())
                for key, t in _templates(scene["blur"]).items()}
        shape, offset, support = max(dice, key=dice.get)
        if dice[(shape, offset, support)] < ORACLE["min_dice"]:  # a smear of color, not an object
            continue
        objects.append({"quadrant": name, "color": list(COLORS)[k], "shape": shape, "offset": offset,
                        "support": support})
        taken[y0:y0 + 32, x0:x0 + 32] |= (_templates()[(shape, offset, support)] > 0) | (c == _N_PLAIN + k)
    scene["objects"] = objects
    # clutter: dark specks on the background, away from objects and ground lines; the darkness
    # threshold rises with the noise and the blocky artifacts so that neither counts as a speck
    dark = np.median(lum) - _box3(lum[:, :, None])[:, :, 0]
    grow = _box3(_box3(taken[:, :, None].astype(np.float32)))[:, :, 0] > 0
    away = ~grow
    away[np.r_[23:31, 55:63]] = False
    thr = max(ORACLE["speck_dark"] * wash, 1.5 * noise, ORACLE["speck_artifacts"][scene["artifacts"]])
    specks = int(((dark > thr) & away).sum())
    t = ORACLE["clutter"]
    scene["clutter"] = "strong" if specks > t[1] else "mild" if specks > t[0] else "none"
    scene["measured"] = {"noise": noise, "bleed": bleed, "specks": specks, "lum": float(np.median(lum))}
    return scene


def oracle_scores(image, prompt):
    """{dimension: score} of a 64x64 image (PIL or uint8 array) for a prompt, read from its pixels:
    the world's own formulas applied to the estimated scene (the blind judge of reward_ft.py)"""
    return true_scores(estimate_scene(image), parse_prompt(prompt))


# -----------------------------------------------------------------------------
# the tiny models: tokenizer, image processor and config built in code

# the tiny teacher and student: same family and tower width; the student's language model has about
# a third of the teacher's parameters (0.07M against 0.19M; 0.16M against 0.28M in all). The
# teacher's tower is as narrow as the student's: under towers as wide as themselves, the 64- and
# 48-wide language models tried read the quadrants (.76-.98) and left the alignment verdict near
# always-yes (.58-.66); under the 32-wide tower the 64-wide one learns it (.92). Measured, not
# explained (docs/TINY_WORLD.md)
TINY_SIZES = {"teacher": dict(hidden=64, layers=2, vision_hidden=32), "student": dict(hidden=32, layers=2)}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# ChatML, as Qwen's templates write it; images become <|vision_start|><|image_pad|><|vision_end|>
TINY_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with whole-word merges for the synthetic world's words.

    It is an instance of the Qwen3.5 tokenizer class (same normalizer, pre-tokenizer and byte-level
    decoder), so it round-trips through save/load and splits digits one by one like the real one.
    Any text encodes (bytes are the fallback); the merges only make the world's words one token.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    words = set(VOCAB) | {"Score", "Prompt", "Rate", "Answer", "Check", "user", "assistant", "system"}
    for text in list(RUBRICS.values()) + list(INSTRUCTIONS.values()):
        words |= {w for w in "".join(c if c.isalpha() else " " for c in text).split()}
    # train BPE with the Qwen3.5 pre-tokenizer until every word, alone or after a space, is one
    # token (an unbounded vocabulary merges each distinct pre-token completely; deterministic)
    pipeline = Qwen3_5Tokenizer()._tokenizer
    bpe = Tokenizer(BPE())
    bpe.normalizer, bpe.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(sorted(words)), "\n".join(sorted(words))], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Qwen3_5Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                           pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_image_processor():
    """Qwen's image processor at the tiny world's scale: 64x64 images pass without resizing."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                    size={"shortest_edge": 32 * 32, "longest_edge": 256 * 256})


def tiny_config(tokenizer, hidden=64, layers=2, vision_depth=2, vision_hidden=None):
    """Hybrid Gated-DeltaNet + full attention, tied embeddings; the tiny teacher is hidden 64 x 2 layers.
    vision_hidden (default: hidden) sets the tower's width; its merger always projects to `hidden`."""
    vision_hidden = vision_hidden or hidden
    from transformers import Qwen3_5Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = 64 * math.ceil(len(tokenizer) / 64)  # room to grow, aligned rows
    layer_types = ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return Qwen3_5Config(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            layer_types=layer_types, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            # rotary dim = head_dim * 0.25 = 8; M-RoPE splits its 4 frequencies over (t, h, w)
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                 mrope_section=[2, 1, 1], mrope_interleaved=True),
            max_position_embeddings=1024, tie_word_embeddings=True,
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=hidden, num_position_embeddings=64),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)


def tiny_score_model(seed=0, **sizes):
    """The embedded default: a ScoreModel on a tiny Qwen3.5-architecture VLM built from tiny_config,
    deterministic given the seed, nothing downloaded (TINY_SIZES names the teacher and student sizes)."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vlm = Qwen3_5ForConditionalGeneration(config)
    return ScoreModel(vlm.eval(), tokenizer, tiny_image_processor(), source="tiny")


# -----------------------------------------------------------------------------
# the tower stage: the vision tower, supervised on the scene's own labels

# per quadrant (read from that quadrant's merged token) and per image (read from the mean token);
# an empty quadrant is class 0 of colour and shape, and has no offset or support (ignored)
QUADRANT_HEADS = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "offset": 3, "support": len(SUPPORTS)}
IMAGE_HEADS = {"noise": 3, "blur": 3, "artifacts": 3, "clutter": 3, "contrast": 2}


def random_scene(rng):
    """(scene, items): a random prompt and a candidate for it, clean, near miss or free"""
    items = sample_items(rng)
    kind = ("clean", "near", "free")[int(rng.choice(3, p=[0.25, 0.25, 0.5]))]
    return _sample_defects(rng, _sample_objects(rng, items, kind)), items


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
    return [render_scene(s) for s in scenes], {k: torch.tensor([l[k] for l in labels]) for k in labels[0]}


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
# the trace check: how well a checkpoint's traces read the image


def line_kind(dimension, line):
    """what a trace line is about: 'item' (alignment prompt item), 'extra', a defect name, or the
    per-object 'centering' / 'support' line"""
    head = line.split(":")[0]
    if head in ("noise", "blur", "artifacts", "clutter", "contrast", "extra"):
        return head
    return {"alignment": "item", "aesthetics": "centering", "plausibility": "support"}.get(dimension, head)


def _item_parts(line):
    """an alignment item line -> (what the quadrant holds, the verdict); ("", "") if malformed"""
    _, _, rest = line.partition(": ")
    seen, _, verdict = rest.rpartition(", ")
    return (seen, verdict) if seen else ("", "")


@torch.no_grad()
def check_traces(model, records, batch_size=32, max_new_tokens=96, rubric="generic"):
    """Greedy traces against the world's own: {dimension: {"lines", "trace", "score_true",
    "score_base", "hpa", "hpa_lines", "hpa_lines_tiebreak"}} (also an "overall" row of the
    three HPAs) and {kind of line: accuracy}. A line counts as right only if it is exactly the
    world's line at the same position; the score line is compared with the annotators' rubric
    ("score_true") and with the rubric the base was pretrained on ("score_base": `rubric`, one of
    TRACE_RUBRICS). An alignment
    item line is also split in two: "item: read" (what the quadrant holds) and "item: verdict"
    (yes / no / at <quadrant>), each right or wrong on its own.

    The HPAs (Eq. 17, against the records' labels) separate reading from scale: "hpa" is the model's
    own score (mu), "hpa_lines" the annotators' rubric applied to its trace lines (rubric_on_lines:
    a score line perfectly calibrated to the annotators, after the same lines), and
    "hpa_lines_tiebreak" the same with ties broken by mu."""
    per_dim, per_kind = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    mu, on_lines = [], []
    model.eval()
    for a in range(0, len(records), batch_size):
        recs = records[a:a + batch_size]
        out = model.score([r["prompt"] for r in recs], [r["image_path"] for r in recs],
                          [r["dimension"] for r in recs], mode="reasoning", max_new_tokens=max_new_tokens)
        mu += [float(m) for m in out.mean]
        for r, text in zip(recs, out.traces):
            items, d = parse_prompt(r["prompt"]), r["dimension"]
            on_lines.append(rubric_on_lines(text, d, items))
            want = make_trace(r["scene"], items, d).split("\n")
            got = text.strip().split("\n")
            for i, w in enumerate(want[:-1]):
                g = got[i].strip() if i < len(got) else ""
                per_dim[d]["lines"].append(g == w)
                kind = line_kind(d, w)
                per_kind[kind].append(g == w)
                if kind == "item":  # "<item>: <what the quadrant holds>, <verdict>.": which half failed
                    (w_seen, w_verdict), (g_seen, g_verdict) = _item_parts(w), _item_parts(g)
                    per_kind["item: read"].append(g_seen == w_seen)
                    per_kind["item: verdict"].append(g_verdict == w_verdict)
            per_dim[d]["trace"].append([g.strip() for g in got[:-1]] == want[:-1])
            said = parse_score(text)
            for column, scores in (("true", true_scores), ("base", TRACE_RUBRICS[rubric])):
                per_dim[d][f"score_{column}"].append(said == score_to_level(scores(r["scene"], items)[d]))
    table = {d: {k: float(np.mean(v)) for k, v in m.items()} for d, m in per_dim.items()}
    mu, on_lines = np.array(mu), np.array(on_lines)
    n = len(records)
    # rubric scores lie on the half-point grid and 1e-3 mu <= .005: the tiebreak reorders only ties
    for name, pred in (("hpa", mu), ("hpa_lines", on_lines), ("hpa_lines_tiebreak", on_lines + 1e-3 * mu)):
        scored = table_from_predictions(records, {"mu": pred, "n_tokens": np.ones(n), "valid": np.ones(n, dtype=bool)})
        for d, row in scored.items():  # every dimension present, and "overall"
            table.setdefault(d, {})[name] = row["hpa"]
    return table, {k: float(np.mean(v)) for k, v in sorted(per_kind.items())}


def format_check(table, kinds, rubric="generic"):
    base = f"score ({rubric})"
    width = max(16, len(base) + 1)
    lines = [f"{'dimension':<13} {'lines':>6} {'trace':>6} {'score (annotators)':>19} {base:>{width}}"]
    for d in DIMENSIONS:
        if d in table:
            t = table[d]
            lines.append(f"{d:<13} {t['lines']:6.3f} {t['trace']:6.3f} {t['score_true']:19.3f} "
                         f"{t['score_base']:{width}.3f}")
    lines.append("per kind of line: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    lines.append("")
    lines.append("HPA against the labels (a tie is a miss): the model's own score; the annotators' rubric applied "
                 "to its trace lines; the same, ties broken by its score")
    lines.append(f"{'dimension':<13} {'its score':>10} {'rubric on lines':>16} {'+ tiebreak':>11}")
    for d in [*DIMENSIONS, "overall"]:
        if d in table:
            t = table[d]
            lines.append(f"{d:<13} {t['hpa']:10.3f} {t['hpa_lines']:16.3f} {t['hpa_lines_tiebreak']:11.3f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the embedded generator (reward_ft.py's default): a small DiT over 8x8 patches of a 64x64 image, prompt tokens as a prefix
SIGMA_MIN = 0.05  # x-prediction: the velocity's 1 / sigma is clamped here


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]  # adaLN: per-sample shift / scale over all tokens


def sigma_embedding(sigma, dim):
    """Sinusoidal features of the noise level, (B,) -> (B, dim), as DiT embeds its timestep."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], -1)


def sincos_2d(grid, dim):
    """(grid * grid, dim) fixed position features: half the channels encode the row, half the column."""
    q = dim // 4
    freqs = 1.0 / 100.0 ** (torch.arange(q, dtype=torch.float32) / q)
    pos = torch.arange(grid, dtype=torch.float32)[:, None] * freqs[None]  # (grid, q)
    row, col = torch.cat([pos.sin(), pos.cos()], -1), torch.cat([pos.sin(), pos.cos()], -1)
    both = torch.cat([row[:, None].expand(grid, grid, 2 * q), col[None].expand(grid, grid, 2 * q)], -1)
    return both.reshape(grid * grid, 4 * q)


class Block(nn.Module):
    """Pre-norm transformer block over text + image tokens, adaLN-Zero on the noise level."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, keep):
        B, T, W = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, -1)  # (B, W) each
        h = modulate(F.layer_norm(x, (W,)), sh1, sc1)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, W/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, T, W)
        x = x + g1[:, None] * self.proj(a)
        h = modulate(F.layer_norm(x, (W,)), sh2, sc2)
        return x + g2[:, None] * self.out(F.gelu(self.fc(h), approximate="tanh"))


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json():
    """The tiny world's tokenizer, serialized; the generator keeps it in its checkpoint."""
    return build_tiny_tokenizer().backend_tokenizer.to_str()


class TinyGenerator(nn.Module):
    """The embedded text-to-image generator: velocity v(x, sigma, prompt) over 64x64 RGB in [-1, 1].

    The prompt's tokens (the tiny world's tokenizer) are a prefix that every image token attends to;
    the noise level enters through adaLN. The network predicts the clean image, from which the
    velocity is derived. Pixel space, so decode() is only a rescale.
    """

    def __init__(self, tokenizer_json, width=128, depth=4, heads=4, patch=8, size=64, max_text=32):
        super().__init__()
        self.config = dict(width=width, depth=depth, heads=heads, patch=patch, size=size, max_text=max_text)
        self.tokenizer_json = tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.grid = size // patch
        n_img, vocab = self.grid ** 2, self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.patch_in = nn.Linear(3 * patch * patch, width)
        # fixed 2-D sin-cos positions (as DiT) plus a learned part: where a token sits is known from step 0
        self.register_buffer("img_sincos", sincos_2d(self.grid, width), persistent=False)
        self.img_pos = nn.Parameter(torch.zeros(n_img, width))
        self.tok = nn.Embedding(vocab, width)
        self.txt_pos = nn.Parameter(torch.randn(max_text, width) * 0.02)
        # a small convolutional text encoder: each token sees its neighbours, so "left" in "a red
        # circle top left" already carries "red circle" when an image token attends to it
        self.txt_conv = nn.ModuleList([nn.Conv1d(width, width, 5, padding=2) for _ in range(2)])
        self.nn_sigma = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.final_ada = nn.Linear(width, 2 * width)
        self.patch_out = nn.Linear(width, 3 * patch * patch)
        for m in (self.final_ada, self.patch_out):  # the untrained model predicts x0 = 0 (gray)
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def fresh(cls, seed=0, **config):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(tiny_tokenizer_json(), **config)

    @property
    def device(self):
        return self.img_pos.device

    @property
    def latent_shape(self):
        return (3, self.config["size"], self.config["size"])

    def sigmas(self, n):
        return torch.linspace(1.0, 0.0, n + 1)  # uniform in sigma: the tiny world needs no shift

    def encode(self, prompts):
        """Prompts -> condition: token ids (B, L) and a mask (B, L); longer prompts are truncated."""
        L = self.config["max_text"]
        rows = [e.ids[:L] for e in self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)]
        n = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), True
        return {"ids": ids.to(self.device), "mask": mask.to(self.device)}

    def forward(self, x, sigma, cond):
        """x (B, 3, S, S) at noise level sigma (B,) -> velocity (B, 3, S, S)."""
        B, p, g = x.shape[0], self.config["patch"], self.grid
        ids, mask = cond["ids"], cond["mask"]
        # the network runs in its weights' dtype (bf16 with --bf16); x, the ODE state, keeps its own (fp32)
        patches = x.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p)
        patches = patches.to(self.patch_in.weight.dtype)
        t = (self.tok(ids) + self.txt_pos[:ids.shape[1]]) * mask[..., None]  # (B, L, W), padding zeroed
        for conv in self.txt_conv:
            t = t + F.gelu(conv(F.layer_norm(t, t.shape[-1:]).transpose(1, 2)).transpose(1, 2)) * mask[..., None]
        h = torch.cat([t, self.patch_in(patches) + self.img_sincos + self.img_pos], 1)  # (B, L + g*g, W)
        c = F.silu(self.nn_sigma(sigma_embedding(sigma, h.shape[-1]).to(h.dtype)))  # (B, W)
        keep = torch.cat([mask, mask.new_ones(B, g * g)], 1)[:, None, None, :]  # padded text is never attended to
        for block in self.blocks:
            h = block(h, c, keep)
        shift, scale = self.final_ada(c).chunk(2, -1)
        h = modulate(F.layer_norm(h[:, ids.shape[1]:], (h.shape[-1],)), shift, scale)
        x0 = self.patch_out(h).reshape(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, g * p, g * p)
        # x-prediction: the network outputs the clean image and the velocity follows from it,
        # v = (x_sigma - x0) / sigma; a 128-wide token cannot carry a 192-dim patch of noise, but it
        # can carry a clean patch (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise")
        return (x - x0.to(x.dtype)) / sigma.clamp_min(SIGMA_MIN).to(x.dtype).view(B, 1, 1, 1)

    def decode(self, x):
        return ((x + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1] pixels, differentiable inside the range

    def to_latent(self, images):
        return images * 2 - 1  # pretraining targets: [0, 1] pixels -> the model's [-1, 1]

    def frozen_copy(self):
        return copy.deepcopy(self).requires_grad_(False).eval()

    def trainable_state(self):
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def metadata(self, **extra):
        meta = {"format": GENERATOR_FORMAT, "kind": "tiny-dit", "config": json.dumps(self.config),
                "tokenizer": self.tokenizer_json}
        return {**meta, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}}

    def load_trainable_state(self, meta, tensors, path):
        """--resume (common.load_resume): the weights of a tiny-generator checkpoint of this config."""
        check_tiny_generator(meta, path)
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit this generator (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")

    @classmethod
    def load(cls, path):
        meta, tensors = read_checkpoint(path)
        check_tiny_generator(meta, path)
        with params_on_meta():  # as ScoreModel.load: no init work, the caller's RNG stream left alone
            gen = cls(meta["tokenizer"], **json.loads(meta["config"]))
        gen.load_state_dict(tensors, assign=True)
        gen.metadata_read = meta
        return gen


def check_tiny_generator(meta, path):
    if meta.get("format") != GENERATOR_FORMAT or meta.get("kind") != "tiny-dit":
        raise ValueError(f"{path} is not a tiny generator checkpoint (format {meta.get('format')!r}, "
                         f"kind {meta.get('kind')!r}; expected {GENERATOR_FORMAT!r}, 'tiny-dit')")


# -----------------------------------------------------------------------------
# the command line: render, tower, check


def _chances(text):
    try:
        p = tuple(float(x) for x in text.split(","))
        check_items_p(p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three chances that sum to 1, e.g. 0.3,0.4,0.3")
    return p


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="the tiny world: render it, train a tiny vision tower, "
                                                 "check a checkpoint's traces")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("render", help="render the labeled world: train.jsonl, test.jsonl and images/ in --out")
    p.add_argument("--out", required=True, help="output directory (train.jsonl, test.jsonl, images/)")
    p.add_argument("--n", type=int, default=200, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--candidates", type=int, default=4, help="images per prompt")
    p.add_argument("--annotators", type=int, default=5, help="simulated annotations per record")
    p.add_argument("--test-frac", type=float, default=0.2, help="fraction of prompts held out")
    p.add_argument("--noise", type=float, default=0.5, help="annotator noise sd (score units)")
    p.add_argument("--trace-rubric", default="true", choices=list(TRACE_RUBRICS),
                   help="scale the traces end on: the annotators' rubric, or a generic one for base pretraining "
                        "(generic: every defect one point; conspicuous: the same, mild defects free; coarse: "
                        "also extra and off-center objects free)")
    p.add_argument("--holdout", default="", metavar="JSONL",
                   help="a JSONL whose prompts are never drawn (e.g. the labeled world's test.jsonl, for a world of "
                        "unlabeled records to distill on)")
    p.add_argument("--items-p", type=_chances, default=ITEMS_P, metavar="P1,P2,P3",
                   help="chances of a prompt naming one, two or three objects (default %(default)s)")
    p.add_argument("--repeat-prompts", action="store_true",
                   help="a prompt may be drawn more than once (the pretraining worlds of make base-v2 "
                        "and base-v3's one-token runs; the split stays by prompt)")
    p = sub.add_parser("tower", help="build a tiny score model and train its vision tower on fresh scenes")
    p.add_argument("--size", default="teacher", choices=sorted(TINY_SIZES), help="which tiny model")
    p.add_argument("--out", required=True, help="score-model .safetensors: trained tower, random language model")
    p.add_argument("--prompt-version", default=PROMPT_VERSION, choices=PROMPT_VERSIONS,
                   help="the prompts the model is trained and scored with (model.rubric_messages; the shipped "
                        "bases are zr-rubric-v1, the image first)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (64 fresh images each)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and of the scene stream")
    p = sub.add_parser("check", help="compare a checkpoint's greedy traces with the world's, line by line")
    p.add_argument("--ckpt", required=True, help="score-model .safetensors")
    p.add_argument("--data", default="runs/world/test.jsonl", help="a world JSONL (records carry their scene)")
    p.add_argument("--limit", type=int, default=256, help="records to check (0 = all)")
    p.add_argument("--rubric", default="generic", choices=[r for r in TRACE_RUBRICS if r != "true"],
                   help="the generic rubric the checkpoint's base was pretrained on, which its score lines are "
                        "also compared with (the shipped bases: generic)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Every value before anything is rendered or built: a count of 0 renders empty files, a negative
    one or a NaN stops deep inside numpy or torch. (Written out here: common.py's argparse types live
    in a module that imports this one.)"""
    least = {"n": 1, "candidates": 1, "annotators": 1, "seed": 0, "steps": 1, "limit": 0}
    for name, low in least.items():
        if getattr(args, name, low) < low:
            parser.error(f"argument --{name}: must be at least {low}, got {getattr(args, name)}")
    for name in ("noise", "lr"):
        x = getattr(args, name, 1.0)
        if not math.isfinite(x) or x < 0 or (name == "lr" and x == 0):
            parser.error(f"argument --{name}: must be a finite number {'above' if name == 'lr' else 'of at least'} 0, "
                         f"got {x}")
    if args.cmd == "render":
        if not 0 <= args.test_frac < 1:
            parser.error(f"argument --test-frac: must be at least 0 and below 1, got {args.test_frac}")
        if args.test_frac > 0 and min(args.n - 1, round(args.n * args.test_frac)) < 1:  # make_world's split
            parser.error(f"--n {args.n} with --test-frac {args.test_frac:g} holds out no prompt, so test.jsonl "
                         f"would be empty: raise --n or --test-frac (--test-frac 0: a world without a test split)")
    if args.cmd == "tower" and not args.out.endswith(".safetensors"):
        parser.error(f"argument --out: {args.out!r} must end in .safetensors")


def tower_stage(args):
    """python tiny_world.py tower: a tiny score model whose vision tower is trained on scene labels, saved."""
    model = tiny_score_model(seed=args.seed, **TINY_SIZES[args.size])
    model.prompt_version = args.prompt_version
    torch.manual_seed(args.seed)
    acc = train_tower(model, steps=args.steps, lr=args.lr, seed=args.seed)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    model.save(args.out, stage="tower", size=args.size, tower_accuracy=acc)


def check_checkpoint(args):
    """python tiny_world.py check: a checkpoint's greedy traces against the world's, printed as a table.
    A missing or bad file, or records that do not come from the world, end in one line (status 2)."""
    try:
        records = load_jsonl(args.data)
        records = records[:args.limit] if args.limit else records
        unseen = [r["id"] for r in records if "scene" not in r]
        if unseen:
            raise ValueError(f"{args.data}: {len(unseen)} records without a scene (e.g. {unseen[0]!r}): check reads "
                             f"the world's own records (tiny_world.py render), which carry the scene they show")
        model = ScoreModel.load(args.ckpt)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_check(*check_traces(model, records, rubric=args.rubric), rubric=args.rubric))


def main(argv=None):
    args = get_args(argv)
    {"render": render, "tower": tower_stage, "check": check_checkpoint}[args.cmd](args)


if __name__ == "__main__":
    main()
