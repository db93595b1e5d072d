"""
Data for Z-Reward: JSONL records, same-prompt pairs, test-label aggregation, and the synthetic
rubric world that the embedded tiny model trains and is evaluated on.

Records. One JSON object per line:
  {"id": str, "prompt": str, "image": path relative to the JSONL file, "dimension": one of
   DIMENSIONS, "scores": [annotations on the half-point grid 1.0, 1.5, ..., 5.0],
   "score": the aggregate label}
Extra keys are kept. load_jsonl() validates every line and adds "image_path", the absolute path
of the image; "image" stays as written so a record can be written back unchanged. "score" may be
left out when "scores" is given (it is then aggregate(scores)); unlabeled data (RISD) has neither
and is read with labeled=False. Test labels follow the paper: drop the highest and the lowest
annotation, average the rest (aggregate). The score model reads 9 levels from the digit tokens
"1".."9": level = 2 s - 1 (score_to_level), s = (level + 1) / 2 (level_to_score).

The synthetic world (DESIGN.md section 4). A 64x64 RGB image is a 2x2 grid of 32x32 quadrants
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
  top left red circle: yes.
  bottom right blue square: no, green square.
  extra: none.
  Score: 6

Make a world:  python data.py --out data/world --n 200 --seed 0
"""

import argparse
import json
import math
import os
import re
import time
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
            if not (_is_number(a) and S_MIN <= a <= S_MAX and float(2 * a).is_integer()):
                return f"annotation {a!r} is not on the half-point grid 1.0, 1.5, ..., 5.0"
    if "score" in r and not (_is_number(r["score"]) and S_MIN <= r["score"] <= S_MAX):
        return f"score {r['score']!r} is not a number in [{S_MIN}, {S_MAX}]"
    if not os.path.isfile(os.path.join(root, r["image"])):
        return f"image file not found: {os.path.join(root, r['image'])}"
    return None

def load_jsonl(path, labeled=True):
    """read and validate a JSONL file; raises ValueError naming the file and line of a bad record"""
    root = os.path.dirname(os.path.abspath(path))
    records, seen = [], {}
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
            if err:
                raise ValueError(f"{path}:{lineno}: {err}")
            seen[r["id"]] = lineno
            if "scores" in r and "score" not in r:
                r["score"] = aggregate(r["scores"])
            r["image_path"] = os.path.join(root, r["image"])
            records.append(r)
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
            said = {"ok": "yes", "missing": "no, empty"}.get(s) or \
                (f"no, at {o['quadrant']}" if s == "moved" else f"no, {o['color']} {o['shape']}")
            lines.append(f"{_name(it)}: {said}.")
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

def make_world(out, n, seed=0, candidates=4, annotators=5, test_frac=0.2, noise=0.5):
    """render n prompts x candidates images and write out/{train,test}.jsonl; returns the records"""
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
            for d in DIMENSIONS:
                scores = annotate(rng, truth[d], annotators, noise)
                r = {"id": f"{group}_c{c}_{d}", "prompt": prompt_text(items), "image": image,
                     "dimension": d, "scores": scores, "score": aggregate(scores),
                     "true_score": truth[d], "group": group, "split": split, "caption": caption,
                     "trace": make_trace(scene, items, d), "scene": scene}
                files[split].write(json.dumps(r) + "\n")
                records.append(r)
    for f in files.values():
        f.close()
    return records

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="render the synthetic rubric world")
    parser.add_argument("--out", required=True, help="output directory (train.jsonl, test.jsonl, images/)")
    parser.add_argument("--n", type=int, default=200, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--candidates", type=int, default=4, help="images per prompt")
    parser.add_argument("--annotators", type=int, default=5, help="simulated annotations per record")
    parser.add_argument("--test-frac", type=float, default=0.2, help="fraction of prompts held out")
    parser.add_argument("--noise", type=float, default=0.5, help="annotator noise sd (score units)")
    args = parser.parse_args()
    t0 = time.time()
    records = make_world(args.out, args.n, args.seed, args.candidates, args.annotators, args.test_frac,
                         args.noise)
    n_train = sum(r["split"] == "train" for r in records)
    print(f"{len(records)} records ({n_train} train, {len(records) - n_train} test), "
          f"{len(records) // len(DIMENSIONS)} images in {args.out} | {time.time() - t0:.1f}s")
