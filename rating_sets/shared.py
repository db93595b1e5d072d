"""
What every converter in rating_sets shares: the scale rule, the split by prompt, images, the
writer of train.jsonl / test.jsonl, and the optional parquet reader.

The scale rule (stated in rating_sets/__init__.py): a rating x on a set's scale [lo, hi] maps
linearly to s = 1 + 4 (x - lo) / (hi - lo) on [1, 5], then snaps to the nearest half point,
floor(2 s + 0.5) / 2 (halves round up, as data.score_to_level does). A rating outside [lo, hi], or
not a finite number, is an error that names the file and the row.

Rows are counted from 0 in the order the file holds them (a parquet file's rows, a JSON list's
items, a CSV file's data rows without the header, a TFRecord file's records).
"""

import hashlib
import io
import json
import math
import os
import shutil
import warnings

from PIL import Image

from data import DIMENSIONS, S_MAX, S_MIN, aggregate

# PIL's format name -> the file extension an extracted image gets
IMAGE_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


# -----------------------------------------------------------------------------
# the scale rule and the split

def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def to_grid(x, lo, hi, where, what="rating"):
    """a rating on [lo, hi] -> the half-point grid on [S_MIN, S_MAX]; `where` names file and row"""
    shown = x
    if isinstance(x, str):  # CSV cells and some published JSON hold numbers as text
        shown = x.strip()
        try:
            x = float(x)
        except ValueError:
            raise ValueError(f"{where}: {what} {x!r} is not a number") from None
    if not is_number(x):
        raise ValueError(f"{where}: {what} {x!r} is not a number")
    if not lo <= x <= hi:
        raise ValueError(f"{where}: {what} {shown} is outside the set's scale [{lo:g}, {hi:g}]")
    s = S_MIN + (S_MAX - S_MIN) * (x - lo) / (hi - lo)
    return math.floor(2 * s + 0.5) / 2


def is_test(prompt, test_frac):
    """the deterministic split for sets without one of their own: a hash of the prompt, so that a
    prompt (and every image of it) is in one split only, whatever the order of the rows"""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < test_frac


def field(row, key, where, kind=None):
    """row[key], or an error naming the row and the missing (or mistyped) field"""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be an object, not {type(row).__name__}")
    if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing field {key!r}")
    if kind is not None and not isinstance(row[key], kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {key!r} must be {names}, not {type(row[key]).__name__}")
    return row[key]


def limited(rows, limit):
    """the first `limit` items of an iterator (all of them when limit is None)"""
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield row


# -----------------------------------------------------------------------------
# parquet (pyarrow stays optional: imported here only, when a parquet file is read)

def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def parquet_rows(path, columns=None, batch_size=16):
    """yield (row index, dict) of a parquet file, a few rows at a time (embedded images are large)"""
    pq = pyarrow_parquet()
    f = open_parquet(pq, path)
    if columns is not None:
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (it has {f.schema_arrow.names})")
    i = 0
    for batch in f.iter_batches(batch_size=batch_size, columns=columns):
        for row in batch.to_pylist():
            yield i, row
            i += 1


def open_parquet(pq, path):
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors (ArrowInvalid, ...) do not name the file
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def parquet_columns(path):
    return open_parquet(pyarrow_parquet(), path).schema_arrow.names


# -----------------------------------------------------------------------------
# images

def image_error(data_or_path):
    """why PIL cannot read an image (bytes or a path), or None"""
    try:
        with Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path) as im:
            fmt = im.format
            im.verify()
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        return f"{type(e).__name__}: {e}"
    return None if fmt else "unknown image format"


class ImageStore:
    """Puts the images of a converted set under OUT/images/NAME and returns their paths relative to OUT.

    Embedded bytes are written to files; an image already on disk is referenced where it lies (its
    path relative to OUT), or copied in with copy=True. Every image is opened and verified here, so
    a bad one is named by its source row rather than by a line of the output. With skip_bad=True a
    missing or unreadable image returns None (the caller drops its row) and is counted."""

    def __init__(self, out, name, copy=False, skip_bad=False):
        self.out, self.name, self.copy, self.skip_bad = os.path.abspath(out), name, copy, skip_bad
        self.folder = os.path.join(self.out, "images", name)
        self.skipped = []

    def bad(self, where, why):
        if not self.skip_bad:
            raise ValueError(f"{where}: {why}")
        self.skipped.append(f"{where}: {why}")
        return None

    def from_bytes(self, data, stem, where):
        """write embedded image bytes to images/NAME/STEM.EXT (EXT from the format PIL reads)"""
        if not isinstance(data, (bytes, bytearray)) or not data:
            return self.bad(where, "no image bytes")
        data = bytes(data)
        err = image_error(data)
        if err:
            return self.bad(where, f"the image bytes cannot be read ({err})")
        with Image.open(io.BytesIO(data)) as im:
            ext = IMAGE_EXTENSIONS.get(im.format, "." + im.format.lower())
        path = os.path.join(self.folder, stem + ext)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return os.path.relpath(path, self.out)

    def from_file(self, path, where, stem=None):
        """an image on disk: referenced where it lies, or copied to images/NAME/STEM.EXT"""
        if path is None or not os.path.isfile(path):
            return self.bad(where, f"image file not found: {path}")
        err = image_error(path)
        if err:
            return self.bad(where, f"image {path} cannot be read ({err})")
        if not self.copy:
            return os.path.relpath(os.path.abspath(path), self.out)
        stem = stem or os.path.splitext(os.path.basename(path))[0]
        dest = os.path.join(self.folder, stem + os.path.splitext(path)[1].lower())
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(path, dest)
        return os.path.relpath(dest, self.out)

    def warn_skipped(self):
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} rows skipped for a missing or unreadable image "
                          f"(first: {self.skipped[0]})", stacklevel=3)


def json_value(path, kind=list, hint="", shape=None):
    """The one value of a JSON file, of type `kind` (a list of annotations or test items, a dict of
    prompts); a missing file, bad JSON or another shape is a ValueError naming the file (`hint` says
    what the set publishes, `shape` what the value must be)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found{f' ({hint})' if hint else ''}")
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: bad JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: {shape or 'expected a JSON ' + ('list' if kind is list else 'object')}")
    return value


def find_file(name, folders):
    """the first folder/name that exists (folders may hold None), else None"""
    for folder in folders:
        if folder is not None:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


# -----------------------------------------------------------------------------
# the writer of a converted set

class Writer:
    """Collects a set's records per split and writes OUT/train.jsonl and OUT/test.jsonl at the end.

    Nothing is written until close(), so a conversion stopped by a bad row leaves no half-written
    JSONL behind (images already extracted stay, and are rewritten by the next run)."""

    def __init__(self, out, name, copy_images=False, skip_bad_images=False):
        self.out, self.name = out, name
        os.makedirs(out, exist_ok=True)
        self.images = ImageStore(out, name, copy=copy_images, skip_bad=skip_bad_images)
        self.splits = {"train": [], "test": []}
        self.ids = set()

    def add(self, split, id, prompt, image, dimension, where, scores=None, score=None, **extra):
        """one record; scores: annotations already on the grid; score: a MOS already on the grid"""
        assert split in self.splits, split
        if dimension not in DIMENSIONS:
            raise ValueError(f"{where}: unknown dimension {dimension!r} (expected one of {DIMENSIONS})")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty or not a string")
        if id in self.ids:
            raise ValueError(f"{where}: duplicate record id {id!r}")
        self.ids.add(id)
        r = {"id": id, "prompt": prompt, "image": image, "dimension": dimension}
        if scores is not None:
            r["scores"] = list(scores)
            r["score"] = aggregate(scores)
        else:
            r["score"] = score
        r.update(extra)
        self.splits[split].append(r)

    def close(self):
        """write both files; an empty split is an error (the training scripts read both)"""
        for split, records in self.splits.items():
            if not records:
                raise ValueError(f"{self.name}: no records went to the {split} split "
                                 f"({sum(map(len, self.splits.values()))} in all); with a split by prompt "
                                 f"raise --test-frac or --limit")
        for split, records in self.splits.items():
            path = os.path.join(self.out, f"{split}.jsonl")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(path + ".tmp", path)
        self.images.warn_skipped()
        counts = {split: len(records) for split, records in self.splits.items()}
        if self.images.skipped:
            counts["skipped"] = len(self.images.skipped)
        return counts
