"""
ImageRewardDB (THUDM/ImageRewardDB on the Hugging Face hub; Apache-2.0): DiffusionDB prompts with
4-9 generated images each, every image rated by an expert annotator and the images of a prompt
ranked.

Files, as published (confirmed against the dataset card and its loading script ImageRewardDB.py):
metadata-train.parquet, metadata-validation.parquet and metadata-test.parquet, one row per image,
columns image_path (e.g. images/train/train_1/UUID.webp), prompt_id (e.g. 001324-0093), prompt,
classification, image_amount_in_total, rank, overall_rating, image_text_alignment_rating,
fidelity_rating. The images are in zips, images/SPLIT/SPLIT_K.zip, holding the UUID.webp files
of folder SPLIT_K (the loading script joins the extracted folder with the file's base name). An
image is looked for, in order: at SRC/image_path (zips already extracted in place), at
IMAGES/image_path, IMAGES/SPLIT_K/UUID.webp or IMAGES/UUID.webp (--images), then inside
SRC/images/SPLIT/SPLIT_K.zip, from which it is extracted to OUT/images/imagereward/SPLIT/UUID.webp.

Ratings are on a 1-7 scale (the card's example row rates 6, 6, 6; the ImageReward paper's rating
step is a 7-point Likert scale), one expert per image, so scores holds one annotation. Mapping:
image_text_alignment_rating -> alignment; fidelity_rating ("whether the output image is true to
the shape and characteristics that the object should have") -> plausibility, and also realism,
which the set does not rate on its own. overall_rating and rank are kept in "raw", unused.
Scale: 1-7 -> [1, 5] (1, 1.5, 2.5, 3, 3.5, 4.5, 5). group: prompt_id. Split: the set's own:
train and validation -> train.jsonl, test -> test.jsonl.
"""

import os
import zipfile

from rating_sets.shared import Writer, field, find_file, limited, parquet_rows, to_grid

NAME = "imagereward"
HUB_ID = "THUDM/ImageRewardDB"
LICENSE = "Apache-2.0"
SCALE = (1, 7)
SPLITS = (("train", "train"), ("validation", "train"), ("test", "test"))  # (file's split, output split)
DIMENSION_COLUMNS = (("alignment", "image_text_alignment_rating"), ("plausibility", "fidelity_rating"),
                     ("realism", "fidelity_rating"))


class ImageFinder:
    """Finds an ImageRewardDB image on disk or in its zip; zips are indexed by base name on first use."""

    def __init__(self, src, images=None):
        self.src, self.images = src, images
        self.zips = {}

    def _zip(self, path):
        if path not in self.zips:
            try:
                z = zipfile.ZipFile(path)
            except zipfile.BadZipFile as e:
                raise ValueError(f"{path}: not a readable zip file ({e})") from None
            self.zips[path] = (z, {os.path.basename(n): n for n in z.namelist() if not n.endswith("/")})
        return self.zips[path]

    def find(self, image_path):
        """-> ("file", path) or ("bytes", data), or (None, what was looked at)"""
        name = os.path.basename(image_path)
        folder = os.path.basename(os.path.dirname(image_path))  # SPLIT_K: a zip extracted into its own folder
        path = find_file(image_path, [self.src, self.images]) or find_file(os.path.join(folder, name), [self.images]) \
            or find_file(name, [self.images])
        if path:
            return "file", path
        zpath = os.path.join(self.src, os.path.dirname(image_path) + ".zip")
        if os.path.isfile(zpath):
            z, members = self._zip(zpath)
            if name in members:
                return "bytes", z.read(members[name])
            return None, f"{name} is not in {zpath}"
        return None, f"image {image_path} not found under {self.src}" + (f" or {self.images}" if self.images else "") \
            + f", and no zip {zpath}"

    def close(self):
        for z, _ in self.zips.values():
            z.close()


def image_for(finder, store, image_path, split, where):
    kind, found = finder.find(image_path)
    if kind == "file":
        return store.from_file(found, where)
    if kind == "bytes":
        stem = os.path.join(split, os.path.splitext(os.path.basename(image_path))[0])
        return store.from_bytes(found, stem, where)
    return store.bad(where, found)


def metadata_file(src, split, required=True):
    path = os.path.join(src, f"metadata-{split}.parquet")
    if required and not os.path.isfile(path):
        raise ValueError(f"{path} not found (ImageRewardDB publishes metadata-train/validation/test.parquet)")
    return path if os.path.isfile(path) else None


def convert(src, out, images=None, limit=None, copy_images=False, skip_bad_images=False):
    """ImageRewardDB download folder -> OUT/train.jsonl, OUT/test.jsonl (images extracted or referenced)"""
    files = [(part, split, metadata_file(src, part, required=part != "validation")) for part, split in SPLITS]
    w = Writer(out, NAME, copy_images=copy_images, skip_bad_images=skip_bad_images)
    finder = ImageFinder(src, images)
    try:
        for part, split, path in files:
            if path is None:
                continue
            for i, row in limited(parquet_rows(path), limit):
                where = f"{path} row {i}"
                image_path = field(row, "image_path", where, str)
                prompt_id, prompt = str(field(row, "prompt_id", where)), field(row, "prompt", where, str)
                scores = {dim: to_grid(field(row, col, where), *SCALE, where, col) for dim, col in DIMENSION_COLUMNS}
                image = image_for(finder, w.images, image_path, part, where)
                if image is None:
                    continue
                stem = os.path.splitext(os.path.basename(image_path))[0]
                raw = {c: row.get(c) for c in ("overall_rating", "image_text_alignment_rating", "fidelity_rating",
                                               "rank", "image_amount_in_total")}
                for dim, col in DIMENSION_COLUMNS:
                    w.add(split, f"{NAME}-{part}-{stem}-{dim}", prompt, image, dim, where, scores=[scores[dim]],
                          group=f"{NAME}-{prompt_id}", raw=raw, source=NAME)
    finally:
        finder.close()
    return w.close()
