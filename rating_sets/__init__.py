"""
Public human-rating sets -> Z-Reward's record contract (data.py; README, Data).

One module per set converts the files as the set publishes them (a download folder) into
OUT/train.jsonl, OUT/test.jsonl and OUT/images/...: embedded image bytes are extracted to files,
images already on disk are referenced by their path relative to OUT (--copy-images copies them),
per-annotator ratings are kept in "scores" where the set has them, and every record carries
"source" and the original values in "raw". Each module has convert(src, out, **opts) ->
{"train": n, "test": n}; the command line is

    python -m rating_sets NAME --src DOWNLOAD_FOLDER --out OUT_FOLDER [--images FOLDER]
        [--test-frac 0.1] [--limit N] [--copy-images] [--skip-bad-images] [--prompts FILE]

rating_sets.pairs converts pairwise preference benchmarks (HPDv2, ImageReward, Pick-a-Pic v2,
HPDv3) into a pair JSONL and scores a model's mu on them.

The scale rule. A rating x on a set's scale [lo, hi] maps linearly onto [1, 5],
s = 1 + 4 (x - lo) / (hi - lo), then snaps to the nearest half point, floor(2 s + 0.5) / 2 (a
half rounds up, as data.score_to_level does). Each annotation is mapped and snapped on its own
into "scores" ("score" is then data.aggregate of them); a set that publishes only a mean opinion
score has that mean mapped and snapped into "score". A rating outside [lo, hi] is an error that
names the file and the row. The source scales:

    genai_bench  1-5 (three annotators)      identity on the grid
    imagereward  1-7 (one expert)            1, 1.5, 2.5, 3, 3.5, 4.5, 5
    richhf       [0, 1] (annotators' mean)   1 + 4 x, snapped
    evalmuse     1-5 (each annotator)        identity on the grid
    agiqa3k      [0, 5] (MOS)                1 + 0.8 x, snapped

Splits: a set's own split where it has one (ImageRewardDB: train + validation -> train, test ->
test; RichHF-18K: train + dev -> train, test -> test); else a deterministic split by a hash of the
prompt (shared.is_test, --test-frac), so that no prompt is in both files. An empty split is an
error (the training scripts read both files).

Errors: a malformed row is a ValueError "FILE row I: what is wrong" (rows counted from 0 in the
file's order: parquet rows, JSON list items, CSV data rows, TFRecord records); the command line
prints it as "error: ..." and exits with status 2. --skip-bad-images drops, and counts, rows whose
image is missing or unreadable instead (a few published images are known to be broken).

Module names are the sets' own (this package is not called "datasets", which would shadow the
library of that name). pyarrow is needed for the parquet sets only and is imported when one is
read; huggingface_hub only for --from-hub.
"""

import importlib

SETS = ("genai_bench", "imagereward", "richhf", "evalmuse", "agiqa3k")


def get(name):
    """the converter module of a set, by name (a '-' may stand for the '_')"""
    key = name.replace("-", "_").lower()
    if key not in SETS:
        raise ValueError(f"unknown rating set {name!r}; expected one of {SETS}")
    return importlib.import_module(f"rating_sets.{key}")
