"""
Data for Z-Reward: JSONL records, same-prompt pairs, test-label aggregation, score levels, and the
metrics read off them.

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

The synthetic world that the embedded tiny models train and are evaluated on (its scenes,
rendering, traces, rubrics and pixel oracle) is tiny_world.py's: python tiny_world.py render --out FOLDER.

Metrics (the paper's, in numpy; eval.py prints them):
1. PLCC and SRCC of the predicted expected score mu against the human label s (SRCC: Spearman
   on average ranks, so ties get the mean of the ranks they span).
2. HPA (Eq. 17): over all pairs of samples within the same group (the caller's group key combines
   prompt and dimension) whose labels differ, s_a != s_b, the fraction whose predicted mu order
   agrees with the human order. A tie in mu does not agree with either order, so it is a miss
   (a constant predictor scores 0; counting ties as half a hit would reward a scorer for every
   pair it cannot tell apart, e.g. one that only counts objects). Margin HPA: the same restricted
   to |s_a - s_b| > 0.5 (margin=0.5).
3. GSB (Eq. 21) for blind pairwise human comparisons: (G - B) / (G + S + B).

Labels are aggregates of several annotations (data.aggregate: drop the highest and the lowest,
average the rest), so label differences are not exact in binary: a difference within 1e-9 of the
margin counts as equal to it, and |s_a - s_b| <= 1e-9 counts as a tie (no pair).
"""

import json
import math
import os
import re
import warnings
from collections import defaultdict

import numpy as np
from PIL import Image

DIMENSIONS = ("alignment", "realism", "aesthetics", "plausibility")
S_MIN, S_MAX = 1.0, 5.0  # the score range; model.BINS is its nine-level half-point grid
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

def jsonl_objects(path):
    """(line number, parsed value) of every non-blank line of a JSONL file: the one reader of JSONL in
    the repository (records here, rating_sets' pair files, eval.py score's queries). A line that is
    not UTF-8 or not JSON is a ValueError naming the file and the line."""
    with open(path, "rb") as f:  # bytes, decoded line by line: a decoding error names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x}, the line's byte "
                                 f"{e.start + 1}); JSONL is UTF-8: re-encode the file, e.g. iconv -f latin1 -t utf-8"
                                 ) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from None


def load_jsonl(path, labeled=True):
    """read and validate a JSONL file; raises ValueError naming the file and line of a bad record"""
    root = os.path.dirname(os.path.abspath(path))
    records, seen, images, disagree = [], {}, {}, []
    for lineno, r in jsonl_objects(path):
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
# metrics: PLCC, SRCC, HPA (Eq. 17), margin HPA, GSB (Eq. 21), and the per-dimension table

EPS = 1e-9  # tolerance on label differences (aggregated labels such as 11/3 are inexact floats)


def _vec(x):
    return np.asarray(x, dtype=np.float64).ravel()


def plcc(x, y):
    """Pearson linear correlation; nan when either side is constant or has fewer than 2 values"""
    x, y = _vec(x), _vec(y)
    assert x.shape == y.shape, f"length mismatch {x.shape} vs {y.shape}"
    if len(x) < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


def rankdata(x):
    """1-based ranks; tied values share the average of the ranks they span"""
    x = _vec(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]  # first element of each run of equal values
    run = np.cumsum(starts) - 1  # run index of each sorted element
    first = np.flatnonzero(starts)
    count = np.diff(np.r_[first, len(x)])
    ranks = np.empty(len(x))
    ranks[order] = (first + (count + 1) / 2)[run]  # ranks first+1 .. first+count, averaged
    return ranks


def srcc(x, y):
    """Spearman rank correlation = Pearson on average ranks"""
    return plcc(rankdata(x), rankdata(y))


def hpa(mu, s, prompt_ids, margin=0.0):
    """human preference accuracy (Eq. 17) over same-group pairs with |s_a - s_b| > margin"""
    mu, s = _vec(mu), _vec(s)
    index = {}  # any hashable key works: a string, or a (prompt, dimension) tuple
    group = np.array([index.setdefault(k, len(index)) for k in prompt_ids], dtype=np.int64)
    assert mu.shape == s.shape == group.shape, "mu, s and prompt_ids must have the same length"
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    hits, total = 0, 0
    for idx in np.split(order, bounds):  # one group: all its pairs at once
        ds = s[idx, None] - s[None, idx]  # (n, n) human gap
        dm = mu[idx, None] - mu[None, idx]  # (n, n) predicted gap
        upper = np.triu(np.ones_like(ds, dtype=bool), k=1)  # each unordered pair once
        valid = upper & (np.abs(ds) > max(margin, 0.0) + EPS)
        agree = np.sign(dm) == np.sign(ds)  # a tie in mu (sign 0) never matches a label gap
        hits += int(agree[valid].sum())
        total += int(valid.sum())
    return hits / total if total else float("nan")


def gsb(good, same, bad):
    """Good-Same-Bad score (Eq. 21) from counts of blind pairwise judgments; nan for no judgments"""
    n = good + same + bad
    return (good - bad) / n if n else float("nan")


def score_metrics(mu, s, groups):
    """the table's columns for one set of predictions: PLCC, SRCC, HPA, margin HPA, n"""
    return {"plcc": plcc(mu, s), "srcc": srcc(mu, s), "hpa": hpa(mu, s, groups),
            "margin_hpa": hpa(mu, s, groups, margin=0.5), "n": len(_vec(mu))}


def table_from_predictions(records, pred):
    """Per-dimension and overall metrics of predictions (from predict) against the records' labels."""
    s = np.array([r["score"] for r in records])
    groups = [(r.get("group", r["prompt"]), r["dimension"]) for r in records]
    # synthetic world: HPA over pairs whose images hold the same number of objects, where counting
    # objects (the shortcut a direct scorer finds first in this world) cannot order the pair
    same_n = [g + (len(r["scene"]["objects"]),) if "scene" in r else None for g, r in zip(groups, records)]
    dims = np.array([r["dimension"] for r in records])
    table = {}
    for dim in [*dict.fromkeys(dims.tolist()), "overall"]:
        m = np.ones(len(records), dtype=bool) if dim == "overall" else dims == dim
        row = score_metrics(pred["mu"][m], s[m], [g for g, k in zip(groups, m) if k])
        keys = [g for g, k in zip(same_n, m) if k]
        row["hpa_same_n"] = hpa(pred["mu"][m], s[m], keys) if None not in keys else float("nan")
        row["tokens"] = float(pred["n_tokens"][m].mean())
        row["valid"] = float(pred["valid"][m].mean())
        table[dim] = row
    return table


def format_table(table, title=None, min_valid=None):
    """The table as text (eval.py --help explains its columns); with min_valid, a row whose valid
    fraction is below it is marked * after that column"""
    cols = ("n", "plcc", "srcc", "hpa", "margin_hpa", "hpa_same_n", "tokens", "valid")
    lines = [title] if title else []
    lines.append(f"{'dimension':<14}" + "".join(f"{c:>12}" for c in cols))
    for dim, row in table.items():
        cells = "".join(f"{row[c]:>12d}" if c == "n" else f"{row[c]:>12.3f}" for c in cols)
        mark = " *" if min_valid is not None and row["valid"] < min_valid else ""
        lines.append(f"{dim:<14}{cells}{mark}")
    if any(line.endswith(" *") for line in lines[1:]):
        lines.append(f"* valid below --min-valid {min_valid:g}: records without a score are read at their trace's "
                     f"last token, so this row's numbers mislead")
    return "\n".join(lines)
