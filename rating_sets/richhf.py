"""
RichHF-18K (github.com/google-research-datasets/richhf-18k; the labels of "Rich Human Feedback
for Text-to-Image Generation", CVPR 2024; no licence file or statement in the repository as seen
when this was written: check it before use): 17,760 Pick-a-Pic v1 images with fine-grained
scores, heatmaps and misaligned-token labels.

Files, as published (confirmed against the repository's README and Google's reader
parse_tfrecord_file.py): train.tfrecord (15,810 records), dev.tfrecord (995) and test.tfrecord
(955), each record a tf.train.Example with features filename (bytes: the Pick-a-Pic file name),
aesthetics_score, artifact_score, misalignment_score, overall_score (floats), artifact_map and
misalignment_map (PNG heatmaps) and prompt_misalignment_label. They are read here without
TensorFlow (rating_sets.tfrecord), checksums verified.

The set ships neither images nor prompts: both come from Pick-a-Pic v1 by the file's uid (its
base name without extension), as the first author's loader (youweiliang/RichHF, get_dataset.py)
does. --images is either a folder of Pick-a-Pic v1 parquet shards as published
(yuvalkirstain/pickapic_v1: columns image_0_uid, image_1_uid, caption, jpg_0, jpg_1), from which
the images are extracted and the captions read, or a folder of image files (FILENAME, its base
name, or UID.png/.jpg/.jpeg/.webp) together with --prompts FILE, a JSON object from uid (or file
name) to the prompt.

Mapping: aesthetics_score -> aesthetics; artifact_score -> plausibility; misalignment_score ->
alignment; overall_score is kept in "raw", unused. Direction: the names say what was annotated,
not which way the score runs; the first author's loader trains these two as the "plausibility"
and "alignment" targets as they are, and the paper rates plausibility and alignment on 5-point
scales where higher is better, so none is inverted (INVERT below flips one if that proves wrong).
Scale: the released scores are the annotators' mean normalized to [0, 1]; [0, 1] -> [1, 5] then
the grid. There are no per-annotator ratings: "score" only. group: the prompt (default). Split:
the set's own: train and dev -> train.jsonl, test -> test.jsonl.
"""

import glob
import os

from rating_sets.shared import Writer, find_file, json_value, open_parquet, pyarrow_parquet, to_grid
from rating_sets.tfrecord import read_examples

NAME = "richhf"
HUB_ID = None  # published on GitHub (Git LFS), not on the hub
LICENSE = "not stated in the repository (check it); images and prompts from Pick-a-Pic v1"
SCALE = (0.0, 1.0)
SPLITS = (("train", "train"), ("dev", "train"), ("test", "test"))
DIMENSION_FEATURES = (("aesthetics", "aesthetics_score"), ("plausibility", "artifact_score"),
                      ("alignment", "misalignment_score"))
PICKAPIC_COLUMNS = ("image_0_uid", "image_1_uid", "caption", "jpg_0", "jpg_1")
INVERT = {"aesthetics_score": False, "artifact_score": False, "misalignment_score": False}


def uid_of(filename):
    return os.path.basename(filename).split(".")[0]


def read_labels(src, verify=True):
    """-> [(file split, output split, where, filename, {dimension: grid score}, {feature: value})] of the
    three TFRecord files; every score is checked here, before any image is looked up"""
    labels = []
    for part, split in SPLITS:
        path = os.path.join(src, f"{part}.tfrecord")
        if not os.path.isfile(path):
            raise ValueError(f"{path} not found (RichHF-18K publishes train.tfrecord, dev.tfrecord, test.tfrecord)")
        for i, ex in read_examples(path, verify=verify):
            where = f"{path} row {i}"
            name = ex.get("filename")
            if not name or not isinstance(name[0], bytes):
                raise ValueError(f"{where}: missing feature 'filename'")
            values = {}
            for dim, feat in DIMENSION_FEATURES + ((None, "overall_score"),):
                v = ex.get(feat)
                if not v or not isinstance(v[0], float):
                    raise ValueError(f"{where}: missing float feature {feat!r}")
                values[feat] = v[0]
            grid = {}
            for dim, feat in DIMENSION_FEATURES:
                grid[dim] = to_grid(values[feat], *SCALE, where, feat)
                if INVERT[feat]:
                    grid[dim] = 6.0 - grid[dim]  # 1 <-> 5 on the grid
            labels.append((part, split, where, name[0].decode("utf-8"), grid, values))
    return labels


def _pickapic(folder, uids):
    """{uid: (caption, image bytes)} for the uids found in the Pick-a-Pic parquet shards under folder.
    The uid and caption columns are read first, a row group at a time; the image columns only of the
    row groups that hold a wanted uid (Pick-a-Pic v1 is some 190 GB of images)."""
    pq = pyarrow_parquet()
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)):
        f = open_parquet(pq, path)
        missing = [c for c in PICKAPIC_COLUMNS if c not in f.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; --images must hold Pick-a-Pic v1 parquet shards")
        for g in range(f.num_row_groups):
            keys = f.read_row_group(g, columns=list(PICKAPIC_COLUMNS[:3])).to_pylist()
            hits = [(r, k, row[f"image_{k}_uid"]) for r, row in enumerate(keys) for k in (0, 1)
                    if row[f"image_{k}_uid"] in uids and row[f"image_{k}_uid"] not in found]
            if not hits:
                continue
            jpgs = f.read_row_group(g, columns=list(PICKAPIC_COLUMNS[3:])).to_pylist()
            for r, k, uid in hits:
                found[uid] = (keys[r]["caption"], jpgs[r][f"jpg_{k}"])
            if len(found) == len(uids):
                return found
    return found


def convert(src, out, images=None, prompts=None, limit=None, copy_images=False, skip_bad_images=False, verify=True):
    """RichHF-18K TFRecords under src + Pick-a-Pic images (and prompts) -> OUT/train.jsonl, OUT/test.jsonl"""
    if images is None:
        raise ValueError("richhf needs --images: the Pick-a-Pic v1 parquet shards, or a folder of its images "
                         "with --prompts (RichHF-18K ships neither images nor prompts)")
    if not os.path.isdir(images):
        raise ValueError(f"--images {images}: not a folder")
    labels = read_labels(src, verify=verify)
    if limit is not None:  # at most `limit` records of each file
        labels = [lab for part, _ in SPLITS for lab in [x for x in labels if x[0] == part][:limit]]
    w = Writer(out, NAME, copy_images=copy_images, skip_bad_images=skip_bad_images)
    shards = glob.glob(os.path.join(images, "**", "*.parquet"), recursive=True)
    if shards:
        table = _pickapic(images, {uid_of(lab[3]) for lab in labels})
    elif prompts is None:
        raise ValueError(f"--images {images} holds no Pick-a-Pic parquet shards: give the prompts with --prompts FILE "
                         f"(a JSON object from uid to prompt)")
    else:
        table = json_value(prompts, dict,
                           shape="--prompts must be a JSON object from Pick-a-Pic uid (or file name) to prompt")
    for part, split, where, filename, grid, values in labels:
        uid = uid_of(filename)
        if shards:
            if uid not in table:
                w.images.bad(where, f"image {filename} (uid {uid}) is in none of the Pick-a-Pic shards under {images}")
                continue
            prompt, data = table[uid]
            image = w.images.from_bytes(data, os.path.join(part, uid), where)
        else:
            prompt = next((table[k] for k in (uid, filename, os.path.basename(filename)) if k in table), None)
            if prompt is None:
                raise ValueError(f"{where}: no prompt for uid {uid} in {prompts}")
            names = [filename, os.path.basename(filename)] + [uid + ext for ext in (".png", ".jpg", ".jpeg", ".webp")]
            path = next((p for p in (find_file(n, [images]) for n in names) if p), None)
            image = w.images.from_file(path or os.path.join(images, os.path.basename(filename)), where)
        if image is None:
            continue
        for dim, _ in DIMENSION_FEATURES:
            w.add(split, f"{NAME}-{part}-{uid}-{dim}", prompt, image, dim, where, score=grid[dim],
                  raw=values, source=NAME)
    return w.close()
