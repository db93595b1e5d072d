"""
AGIQA-3K (github.com/lcysyzxdxc/AGIQA-3k-Database; MIT licence file in that repository): 2,982
images from six generators (AttnGAN, DALL-E 2, GLIDE, Midjourney, Stable Diffusion 1.5 and XL)
with mean opinion scores for perceptual quality and for text-image alignment.

Files, as published (confirmed against the repository's data.csv): data.csv with columns name
(the image's file name), prompt, adj1, adj2, style, mos_quality, std_quality, mos_align,
std_align; the images come as a separate download (a zip of the NAME files, linked from the
README). An image is looked for at IMAGES/name (--images), SRC/name, then SRC/AGIQA-3K/name.

Scale: the MOS are on [0, 5] (the published values run from about 0.2 for AttnGAN to about 4 for
the best images); [0, 5] -> [1, 5], then snapped to the grid into "score". There are no
per-annotator ratings (only their mean and standard deviation, kept in "raw"): score only.

Mapping: mos_align -> alignment. mos_quality -> realism only, by default. The set's "perceptual
quality" is what the realism rubric asks (free of noise, blur and artifacts); it mixes in taste,
but it is one judgment, and writing it under aesthetics as well would double its weight and
present one number as two independent ratings. quality_dims=("realism", "aesthetics") writes
both for those who want it. group: the prompt (default; six generators share each prompt).
Split: a hash of the prompt (--test-frac).
"""

import csv
import os

from rating_sets.shared import Writer, find_file, is_test, limited, to_grid

NAME = "agiqa3k"
HUB_ID = None  # published on GitHub and cloud drives, not on the hub
LICENSE = "MIT"
SCALE = (0.0, 5.0)
QUALITY_DIMENSIONS = ("realism",)
COLUMNS = ("name", "prompt", "mos_quality", "std_quality", "mos_align", "std_align")


def rows(path):
    """yield (row, line, dict) of data.csv; a missing column is an error"""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found (AGIQA-3K publishes data.csv)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (it has {reader.fieldnames})")
        for i, row in enumerate(reader):
            yield i, reader.line_num, row


def convert(src, out, images=None, test_frac=0.1, limit=None, copy_images=False, skip_bad_images=False,
            quality_dims=QUALITY_DIMENSIONS):
    """AGIQA-3K data.csv (+ images) -> OUT/train.jsonl, OUT/test.jsonl"""
    path = os.path.join(src, "data.csv") if os.path.isdir(src) else src
    root = os.path.dirname(path)
    w = Writer(out, NAME, copy_images=copy_images, skip_bad_images=skip_bad_images)
    for i, line, row in limited(rows(path), limit):
        where = f"{path} row {i} (line {line})"
        for c in COLUMNS:
            if row.get(c) is None or row[c].strip() == "":
                raise ValueError(f"{where}: missing field {c!r}")
        name, prompt = row["name"].strip(), row["prompt"]
        quality = to_grid(row["mos_quality"], *SCALE, where, "mos_quality")
        align = to_grid(row["mos_align"], *SCALE, where, "mos_align")
        found = find_file(name, [images, root, os.path.join(root, "AGIQA-3K")])
        image = w.images.from_file(found or os.path.join(images or root, name), where)
        if image is None:
            continue
        try:
            raw = {c: float(row[c]) for c in COLUMNS[2:]}
        except ValueError:
            raise ValueError(f"{where}: std_quality or std_align is not a number") from None
        split = "test" if is_test(prompt, test_frac) else "train"
        stem = os.path.splitext(name)[0]
        for dim, score in [("alignment", align)] + [(d, quality) for d in quality_dims]:
            w.add(split, f"{NAME}-{stem}-{dim}", prompt, image, dim, where, score=score, raw=raw, source=NAME)
    return w.close()
