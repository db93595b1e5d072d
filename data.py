"""
Data for Z-Reward: JSONL records, same-prompt pairs, test-label aggregation, and the synthetic
rubric world that the embedded tiny model trains and is evaluated on.

Records. One JSON object per line:
  {"id": str, "prompt": str, "image": path relative to the JSONL file, "dimension": one of
   DIMENSIONS, "scores": [annotations on the half-point grid 1.0, 1.5, ..., 5.0],
   "score": the aggregate label}
Optional: "group" (records to pair and rank together; default: the prompt). Extra keys are kept
and ignored by the scripts (the synthetic world's records carry their scene, caption and trace).
load_jsonl() validates every line, opens and verifies every image, and adds "image_path", the
absolute path of the image; "image" stays as written so a record can be written back unchanged.
"score" may be left out when "scores" is given (it is then aggregate(scores)); when both are given
and disagree, "score" is the label and load_jsonl warns once per file. Unlabeled data (RISD) has
neither and is read with labeled=False. Test labels follow the paper: drop the highest and the lowest
annotation, average the rest (aggregate). The score model reads 9 levels from the digit tokens
"1".."9": level = 2 s - 1 (score_to_level), s = (level + 1) / 2 (level_to_score).

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
traces on a generic rubric instead, generic_scores: every defect one point, whatever its kind.

Make a world:  python data.py --out data/world --n 200 --seed 0
"""

import argparse
import json
import math
import os
import re
import time
import warnings
from collections import defaultdict

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DIMENSIONS = ("alignment", "realism", "aesthetics", "plausibility")
S_MIN, S_MAX = 1.0, 5.0
SCORE_MARKER = "Score:"

# -----------------------------------------------------------------------------
# records, labels and pairs

def score_to_level(s):
    """half-point score 1.0..5.0 -> level 1..9 (off-grid scores round to the nearest level)"""
    if not S_MIN <= s <= S_MAX:
        raise ValueError(f"score {s} outside [{S_MIN}, {S_MAX}]")
    return int(math.floor(2 * s - 1 + 0.5))  # floor(x + 0.5), not round(): no banker's rounding

def level_to_score(level):
    return (level + 1) / 2

def aggregate(scores):
    """drop the highest and the lowest annotation, average the rest; fewer than 3: plain mean"""
    s = sorted(float(x) for x in scores)
    if not s:
        raise ValueError("aggregate() needs at least one annotation")
    if len(s) >= 3:
        s = s[1:-1]
    return sum(s) / len(s)

def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

def _check(r, labeled, root):
    # returns an error message for a bad record, or None
    if not isinstance(r, dict):
        return "a record must be a JSON object"
    missing = [k for k in ("id", "prompt", "image", "dimension") if k not in r]
    if labeled and "scores" not in r and "score" not in r:
        missing.append("scores (or score)")
    if missing:
        return f"missing keys {missing}"
    if not isinstance(r["id"], (str, int)) or not isinstance(r["prompt"], str) \
            or not isinstance(r["image"], str):
        return "id must be a string (or int), prompt and image strings"
    if r["dimension"] not in DIMENSIONS:
        return f"unknown dimension {r['dimension']!r} (expected one of {DIMENSIONS})"
    if "scores" in r:
        if not isinstance(r["scores"], list) or not r["scores"]:
            return "scores must be a non-empty list"
        for a in r["scores"]:
            if isinstance(a, str):
                return f"annotation {a!r} is a string; write it as a JSON number ({a.strip()})"
            if not (_is_number(a) and S_MIN <= a <= S_MAX and float(2 * a).is_integer()):
                return f"annotation {a!r} is not on the half-point grid 1.0, 1.5, ..., 5.0"
    if "score" in r and isinstance(r["score"], str):
        return f"score {r['score']!r} is a string; write it as a JSON number ({r['score'].strip()})"
    if "score" in r and not (_is_number(r["score"]) and S_MIN <= r["score"] <= S_MAX):
        return f"score {r['score']!r} is not a number in [{S_MIN}, {S_MAX}]"
    if not os.path.isfile(os.path.join(root, r["image"])):
        return f"image file not found: {os.path.join(root, r['image'])}"
    return None

def _check_image(path):
    # an error message for an image PIL cannot read (a text file named .png, a truncated file), or None
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        return f"image {path} cannot be read ({type(e).__name__}: {e})"
    return None

def load_jsonl(path, labeled=True):
    """read and validate a JSONL file; raises ValueError naming the file and line of a bad record"""
    root = os.path.dirname(os.path.abspath(path))
    records, seen, images, disagree = [], {}, {}, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
            err = _check(r, labeled, root)
            if err is None and r["id"] in seen:
                err = f"duplicate id {r['id']!r} (first on line {seen[r['id']]})"
            if err is None:  # every image once: a bad one is named now, not when its batch comes up
                image = os.path.join(root, r["image"])
                err = images[image] if image in images else images.setdefault(image, _check_image(image))
            if err:
                raise ValueError(f"{path}:{lineno}: {err}")
            seen[r["id"]] = lineno
            if "scores" in r and "score" not in r:
                r["score"] = aggregate(r["scores"])
            elif "scores" in r and abs(r["score"] - aggregate(r["scores"])) > 1e-6:
                disagree.append((lineno, r["score"], aggregate(r["scores"])))
            r["image_path"] = os.path.join(root, r["image"])
            records.append(r)
    if disagree:
        line, s, agg = disagree[0]
        warnings.warn(f"{path}: {len(disagree)} records give a 'score' that differs from the aggregate of their "
                      f"'scores' (first: line {line}, score {s} against {agg:g}); 'score' is the label used",
                      stacklevel=2)
    return records

def group_records(records):
    """{(group, dimension): [records]} in first-seen order; group is "group", else the prompt"""
    groups = defaultdict(list)
    for r in records:
        groups[(r.get("group", r["prompt"]), r["dimension"])].append(r)
    return groups

def make_pairs(records):
    """same-prompt, same-dimension (winner, loser) pairs with s_w > s_l; ties give no pair"""
    pairs = []
    for members in group_records(records).values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if a["score"] != b["score"]:
                    pairs.append((a, b) if a["score"] > b["score"] else (b, a))
    return pairs

def parse_score(text):
    """the level after the last SCORE_MARKER in a generated text, or None (parse-text ablation)"""
    m = re.findall(re.escape(SCORE_MARKER) + r"\s*([1-9])", text)
    return int(m[-1]) if m else None

# -----------------------------------------------------------------------------
# the synthetic world: vocabulary and scenes

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

def defect_counts(scene, items):
    """{dimension: number of defects}, every kind and severity counted once (the generic rubric)"""
    status, extras = check_alignment(scene, items)
    objs = scene["objects"]
    return {
        "alignment": sum(s != "ok" for s, _ in status) + len(extras),
        "realism": sum(scene[k] != "none" for k in ("noise", "blur", "artifacts")),
        "aesthetics": sum(o["offset"] != 0 for o in objs) + (scene["clutter"] != "none") + (scene["contrast"] == "low"),
        "plausibility": sum(o["support"] != "grounded" for o in objs),
    }

def generic_scores(scene, items):
    """{dimension: score} on a generic rubric that is not the annotators': every defect costs one
    point, whatever its kind or severity (max(1, 5 - defects)). The tiny base is pretrained on
    traces that end on this scale, so that zero-shot it reasons right but scores on the wrong scale,
    as a pretrained VLM does before it learns a rubric."""
    return {d: max(S_MIN, S_MAX - float(n)) for d, n in defect_counts(scene, items).items()}

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
            # comparison one of two phrases already written (README, "The embedded tiny default")
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
# sampling prompts, candidates and annotators

def _pick(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]

def sample_items(rng):
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
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

def make_world(out, n, seed=0, candidates=4, annotators=5, test_frac=0.2, noise=0.5, trace_rubric="true"):
    """render n prompts x candidates images and write out/{train,test}.jsonl; returns the records.
    trace_rubric: the scale the records' traces end on, "true" (the annotators' rubric) or "generic"
    (generic_scores: the tiny base's pretraining world)"""
    if trace_rubric not in ("true", "generic"):
        raise ValueError(f"trace_rubric must be 'true' or 'generic', got {trace_rubric!r}")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    prompts, texts = [], set()
    while len(prompts) < n:  # distinct prompts, so that train and test share none
        items = sample_items(rng)
        if prompt_text(items) not in texts:
            texts.add(prompt_text(items))
            prompts.append(items)
    n_test = min(n - 1, round(n * test_frac)) if n > 1 and test_frac > 0 else 0
    files = {split: open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8")
             for split in ("train", "test")}
    records = []
    for p, items in enumerate(prompts):
        split, group = ("test" if p >= n - n_test else "train"), f"p{p:05d}"
        for c, scene in enumerate(sample_candidates(rng, items, candidates)):
            image = f"images/{group}_c{c}.png"
            render_scene(scene).save(os.path.join(out, image))
            truth, caption = true_scores(scene, items), make_caption(scene)
            traced = truth if trace_rubric == "true" else generic_scores(scene, items)
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

# -----------------------------------------------------------------------------
# the oracle: the world's scores read back from the pixels of any 64x64 image

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
        objects.append({"quadrant": name, "color": list(COLORS)[k], "shape": shape, "offset": offset, "support": support})
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

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="render the synthetic rubric world")
    parser.add_argument("--out", required=True, help="output directory (train.jsonl, test.jsonl, images/)")
    parser.add_argument("--n", type=int, default=200, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--candidates", type=int, default=4, help="images per prompt")
    parser.add_argument("--annotators", type=int, default=5, help="simulated annotations per record")
    parser.add_argument("--test-frac", type=float, default=0.2, help="fraction of prompts held out")
    parser.add_argument("--noise", type=float, default=0.5, help="annotator noise sd (score units)")
    parser.add_argument("--trace-rubric", default="true", choices=["true", "generic"],
                        help="scale the traces end on: the annotators' rubric, or the generic one (base pretraining)")
    args = parser.parse_args()
    t0 = time.time()
    records = make_world(args.out, args.n, args.seed, args.candidates, args.annotators, args.test_frac,
                         args.noise, args.trace_rubric)
    n_train = sum(r["split"] == "train" for r in records)
    print(f"{len(records)} records ({n_train} train, {len(records) - n_train} test), "
          f"{len(records) // len(DIMENSIONS)} images in {args.out} | {time.time() - t0:.1f}s")
