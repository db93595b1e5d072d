"""
Pairwise preference benchmarks -> one pair JSONL, and the pair accuracy of a model's mu on it.

A pair file has one JSON object a line:
    {"id": str, "prompt": str, "image_a": path, "image_b": path, "preferred": "a" or "b"}
with the images' paths relative to the file (extra keys such as "source" are kept). Ties are
left out. Command line:

    python -m rating_sets.pairs NAME --src PATH --out PAIRS.jsonl [--images FOLDER] [--limit N]
        [--copy-images] [--skip-bad-images]

Embedded images are extracted to images/NAME/ beside PAIRS.jsonl; images on disk are referenced.
The benchmarks, as published (confirmed against each set's card or reader):

  * hpdv2: HPDv2's test.json (ymhao/HPDv2 on the hub; Apache-2.0), a JSON list of {prompt,
    image_path: [file names], rank: [averaged rank of each image, 1 = best], raw_annotations:
    [{rank, user_hash}] per annotator}. Every two images of a prompt with different ranks make a
    pair (the lower rank preferred, as HPSv2's own ranking evaluation reads it); raw_annotations
    are not used. Images: --images FOLDER (test.tar.gz extracted), else beside test.json or in
    its test/ folder.
  * imagereward: ImageRewardDB's metadata-test.parquet (rank within a prompt_id, 1 = best; images
    as rating_sets.imagereward finds them), or the ImageReward repository's data/test.json, a
    list of {id, prompt, generations: [paths], ranking: [ranks]} with images under --images (its
    --img_prefix). Every untied pair of a prompt's images, the lower rank preferred. Apache-2.0.
  * pickapic: Pick-a-Pic v2's test_unique split (yuvalkirstain/pickapic_v2:
    data/test_unique-*.parquet), columns caption, jpg_0, jpg_1 (image bytes), label_0, label_1
    (1/0 a preference, 0.5/0.5 a tie, left out). The card states no licence.
  * hpdv3: HPDv3's test.json (MizzenAI/HPDv3 on the hub; MIT), a JSON list of {prompt, path1,
    path2, model1, model2, confidence, choice_dist, ...} whose path1 is the preferred image
    (as the LightRFT HPDv3 reader takes it); paths relative to test.json's folder (images.tar.gz
    extracted there) or to --images. Which image is "a" alternates with the row, so that "a" is
    not always the preferred one.

Then, from a model's mu for each image of a pair (one per dimension, aggregated by aggregate_mu),
pair_accuracy gives the share of pairs whose preferred image has the higher mu, a tie counting half.
"""

import argparse
import glob
import json
import os
import sys
from collections import OrderedDict

import numpy as np

from data import DIMENSIONS, jsonl_objects
from rating_sets.shared import ImageStore, field, find_file, image_error, is_number, json_value, limited, parquet_rows
from rating_sets.imagereward import ImageFinder, image_for

PAIR_SETS = ("hpdv2", "imagereward", "pickapic", "hpdv3")


def rank_pairs(ranks):
    """every (i, j, preferred) with i < j whose ranks differ; the lower rank is preferred"""
    return [(i, j, "a" if ranks[i] < ranks[j] else "b")
            for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] != ranks[j]]


def _load_json_value(src, default_name):
    """The benchmark's JSON list at `src`, a file or the folder that holds `default_name` -> (path, rows)."""
    path = os.path.join(src, default_name) if os.path.isdir(src) else src
    return path, json_value(path)


def _ranks(row, key, n, where):
    ranks = field(row, key, where, list)
    if len(ranks) != n:
        raise ValueError(f"{where}: {len(ranks)} ranks for {n} images")
    for r in ranks:
        if not is_number(r):
            raise ValueError(f"{where}: rank {r!r} is not a number")
    return ranks


class _Out:
    """collects pairs and writes the pair JSONL; images go to images/NAME beside it"""

    def __init__(self, out, name, copy_images=False, skip_bad_images=False):
        self.path, self.name = out, name
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        self.images = ImageStore(folder, name, copy=copy_images, skip_bad=skip_bad_images)
        self.pairs = []

    def add(self, id, prompt, image_a, image_b, preferred, where, **extra):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty or not a string")
        self.pairs.append({"id": id, "prompt": prompt, "image_a": image_a, "image_b": image_b,
                           "preferred": preferred, "source": self.name, **extra})

    def close(self):
        if not self.pairs:
            raise ValueError(f"{self.name}: no untied pairs were found")
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            for p in self.pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        os.replace(self.path + ".tmp", self.path)
        self.images.warn_skipped()
        counts = {"pairs": len(self.pairs)}
        if self.images.skipped:
            counts["skipped"] = len(self.images.skipped)
        return counts


def _ranked_groups(o, groups):
    """groups: [(where, id, prompt, [image or None], ranks)] -> every untied pair of each group"""
    for where, gid, prompt, images, ranks in groups:
        for i, j, pref in rank_pairs(ranks):
            if images[i] is not None and images[j] is not None:
                o.add(f"{o.name}-{gid}-{i}-{j}", prompt, images[i], images[j], pref, where)


def convert_hpdv2(src, out, images=None, limit=None, copy_images=False, skip_bad_images=False):
    """HPDv2 test.json -> pair JSONL"""
    path, rows = _load_json_value(src, "test.json")
    root = os.path.dirname(path)
    o = _Out(out, "hpdv2", copy_images, skip_bad_images)
    groups = []
    for i, row in limited(enumerate(rows), limit):
        where = f"{path} row {i}"
        prompt = field(row, "prompt", where, str)
        paths = field(row, "image_path", where, list)
        ranks = _ranks(row, "rank", len(paths), where)
        imgs = [o.images.from_file(find_file(p, [images, root, os.path.join(root, "test")]) or
                                   os.path.join(images or root, p), f"{where} ({p})") for p in paths]
        groups.append((where, i, prompt, imgs, ranks))
    _ranked_groups(o, groups)
    return o.close()


def convert_imagereward(src, out, images=None, limit=None, copy_images=False, skip_bad_images=False):
    """ImageRewardDB metadata-test.parquet, or the ImageReward repository's data/test.json -> pair JSONL"""
    o = _Out(out, "imagereward", copy_images, skip_bad_images)
    parquet = os.path.join(src, "metadata-test.parquet") if os.path.isdir(src) else src
    if parquet.endswith(".parquet") and os.path.isfile(parquet):
        root = os.path.dirname(parquet)
        finder = ImageFinder(root, images)
        by_prompt = OrderedDict()
        try:
            for i, row in parquet_rows(parquet):
                where = f"{parquet} row {i}"
                pid = str(field(row, "prompt_id", where))
                rank = field(row, "rank", where)
                if not is_number(rank):
                    raise ValueError(f"{where}: rank {rank!r} is not a number")
                if pid not in by_prompt:
                    if limit is not None and len(by_prompt) >= limit:
                        continue  # --limit counts prompts here: a pair needs its whole group
                    by_prompt[pid] = (where, field(row, "prompt", where, str), [], [])
                image = image_for(finder, o.images, field(row, "image_path", where, str), "test", where)
                by_prompt[pid][2].append(image)
                by_prompt[pid][3].append(rank)
        finally:
            finder.close()
        _ranked_groups(o, [(where, pid, prompt, imgs, ranks)
                           for pid, (where, prompt, imgs, ranks) in by_prompt.items()])
        return o.close()
    path, rows = _load_json_value(src, "test.json")
    root = os.path.dirname(path)
    groups = []
    for i, row in limited(enumerate(rows), limit):
        where = f"{path} row {i}"
        prompt = field(row, "prompt", where, str)
        paths = field(row, "generations", where, list)
        ranks = _ranks(row, "ranking", len(paths), where)
        imgs = [o.images.from_file(find_file(p, [images, root]) or os.path.join(images or root, p),
                                   f"{where} ({p})") for p in paths]
        groups.append((where, row.get("id", i), prompt, imgs, ranks))
    _ranked_groups(o, groups)
    return o.close()


def convert_pickapic(src, out, limit=None, skip_bad_images=False):
    """Pick-a-Pic v2 test_unique parquet (a file, or a folder holding test_unique-*.parquet) -> pair JSONL"""
    if os.path.isdir(src):
        files = sorted(glob.glob(os.path.join(src, "**", "test_unique*.parquet"), recursive=True))
        if not files:
            raise ValueError(f"{src}: no test_unique*.parquet files "
                             f"(Pick-a-Pic v2 publishes data/test_unique-*.parquet)")
    else:
        files = [src]
    o = _Out(out, "pickapic", skip_bad_images=skip_bad_images)
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        for i, row in limited(parquet_rows(path), limit):
            where = f"{path} row {i}"
            prompt = field(row, "caption", where, str)
            l0, l1 = field(row, "label_0", where), field(row, "label_1", where)
            if not (is_number(l0) and is_number(l1) and {l0, l1} in ({0, 1}, {0.5})):
                raise ValueError(f"{where}: labels ({l0!r}, {l1!r}) are neither a preference (1, 0 / 0, 1) "
                                 f"nor a tie (0.5, 0.5)")
            if l0 == l1:
                continue  # a tie: not a pair
            a = o.images.from_bytes(field(row, "jpg_0", where), f"{stem}/{i:05d}_0", f"{where} (jpg_0)")
            b = o.images.from_bytes(field(row, "jpg_1", where), f"{stem}/{i:05d}_1", f"{where} (jpg_1)")
            if a is None or b is None:
                continue
            o.add(f"pickapic-{stem}-{i}", prompt, a, b, "a" if l0 > l1 else "b", where,
                  ranking_id=row.get("ranking_id"))
    return o.close()


def convert_hpdv3(src, out, images=None, limit=None, copy_images=False, skip_bad_images=False):
    """HPDv3 test.json -> pair JSONL (path1 preferred; its place alternates between a and b)"""
    path, rows = _load_json_value(src, "test.json")
    root = os.path.dirname(path)
    o = _Out(out, "hpdv3", copy_images, skip_bad_images)
    for i, row in limited(enumerate(rows), limit):
        where = f"{path} row {i}"
        prompt = field(row, "prompt", where, str)
        found = [o.images.from_file(find_file(p, [images, root]) or os.path.join(images or root, p), f"{where} ({p})")
                 for p in (field(row, "path1", where, str), field(row, "path2", where, str))]
        if None in found:
            continue
        win, lose = found
        if i % 2 == 0:
            o.add(f"hpdv3-{i}", prompt, win, lose, "a", where)
        else:
            o.add(f"hpdv3-{i}", prompt, lose, win, "b", where)
    return o.close()


CONVERTERS = {"hpdv2": convert_hpdv2, "imagereward": convert_imagereward, "pickapic": convert_pickapic,
              "hpdv3": convert_hpdv3}


# -----------------------------------------------------------------------------
# reading a pair file, and scoring

def load_pairs(path):
    """read and validate a pair JSONL; adds image_a_path / image_b_path (absolute). A bad line is a
    ValueError naming the file and the line; so is an empty file."""
    root = os.path.dirname(os.path.abspath(path))
    pairs, seen, checked = [], {}, {}
    for lineno, p in jsonl_objects(path):
        err = None
        if not isinstance(p, dict):
            err = "a pair must be a JSON object"
        elif [k for k in ("id", "prompt", "image_a", "image_b", "preferred") if k not in p]:
            err = f"missing keys {[k for k in ('id', 'prompt', 'image_a', 'image_b', 'preferred') if k not in p]}"
        elif not isinstance(p["id"], (str, int)) or \
                not all(isinstance(p[k], str) for k in ("prompt", "image_a", "image_b")):
            err = "id must be a string (or int), prompt, image_a and image_b strings"
        elif p["preferred"] not in ("a", "b"):
            err = f"preferred must be \"a\" or \"b\", not {p['preferred']!r}"
        elif p["id"] in seen:
            err = f"duplicate id {p['id']!r} (first on line {seen[p['id']]})"
        else:
            for k in ("image_a", "image_b"):
                image = os.path.join(root, p[k])
                if image not in checked:  # every image once: a benchmark reuses its images across pairs
                    if not os.path.isfile(image):
                        checked[image] = f"image file not found: {image}"
                    else:
                        why = image_error(image)
                        checked[image] = why and f"image {image} cannot be read ({why})"
                err = err or (checked[image] and f"{k}: {checked[image]}")
        if err:
            raise ValueError(f"{path}:{lineno}: {err}")
        seen[p["id"]] = lineno
        p["image_a_path"], p["image_b_path"] = os.path.join(root, p["image_a"]), os.path.join(root, p["image_b"])
        pairs.append(p)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def pair_accuracy(mu_a, mu_b, preferred):
    """share of pairs whose preferred image has the higher mu; equal mu counts as half a pair"""
    a, b, pref = np.asarray(mu_a, dtype=float), np.asarray(mu_b, dtype=float), np.asarray(preferred)
    if a.ndim != 1 or a.shape != b.shape or pref.shape != a.shape:
        raise ValueError(f"mu_a, mu_b and preferred must be 1-d and of one length, "
                         f"not {a.shape}, {b.shape}, {pref.shape}")
    if not len(a):
        raise ValueError("pair_accuracy() needs at least one pair")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("mu_a or mu_b holds a non-finite value")
    if not np.isin(pref, ["a", "b"]).all():
        raise ValueError(f"preferred must be 'a' or 'b', found {sorted(set(pref.tolist()) - {'a', 'b'})}")
    margin = np.where(pref == "a", a - b, b - a)
    return float(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0)).mean())


def aggregate_mu(per_dim, weights=None):
    """weighted mean of the per-dimension mu: {dimension: array} -> array. Default: equal weights over
    the dimensions given (the four, normally); with weights, a dimension without one weighs 0."""
    if not per_dim:
        raise ValueError("aggregate_mu() needs at least one dimension")
    unknown = [d for d in per_dim if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown dimensions {unknown} (expected some of {DIMENSIONS})")
    weights = {d: 1.0 for d in per_dim} if weights is None else dict(weights)
    missing = [d for d in weights if d not in per_dim]
    if missing:
        raise ValueError(f"weights for dimensions without mu: {missing}")
    if any(not is_number(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be non-negative numbers with a positive sum, not {weights}")
    arrays = {d: np.asarray(v, dtype=float) for d, v in per_dim.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"the dimensions' mu differ in shape: { {d: a.shape for d, a in arrays.items()} }")
    total = sum(weights.values())
    return sum(weights.get(d, 0.0) * a for d, a in arrays.items()) / total


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rating_sets.pairs",
                                description="convert a pairwise preference benchmark into a pair JSONL")
    p.add_argument("name", help=f"the benchmark: {', '.join(PAIR_SETS)}")
    p.add_argument("--src", required=True, help="the benchmark's file or download folder")
    p.add_argument("--out", required=True, help="the pair JSONL to write (images/ goes beside it)")
    p.add_argument("--images", help="the images' folder, where they are not beside --src")
    p.add_argument("--limit", type=int, help="read at most N rows (imagereward parquet: N prompts)")
    p.add_argument("--copy-images", action="store_true", help="copy images on disk instead of referencing them")
    p.add_argument("--skip-bad-images", action="store_true", help="drop pairs with a missing or unreadable image")
    args = p.parse_args(argv)
    try:
        if args.name not in CONVERTERS:
            raise ValueError(f"unknown benchmark {args.name!r}; expected one of {PAIR_SETS}")
        if not os.path.exists(args.src):
            raise ValueError(f"--src {args.src}: no such file or folder")
        opts = {"limit": args.limit, "skip_bad_images": args.skip_bad_images}
        if args.name != "pickapic":
            opts.update(images=args.images, copy_images=args.copy_images)
        elif args.images or args.copy_images:
            raise ValueError("--images and --copy-images do not apply to pickapic (its images are embedded)")
        counts = CONVERTERS[args.name](args.src, args.out, **opts)
    except (ValueError, OSError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"{args.name}: {counts['pairs']} pairs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
