"""
Tests of rating_sets: each public rating set's converter on a few rows written in the set's
published format (the text formats from tests/fixtures/rating_sets, the parquet files, zips and
TFRecords built here, with tiny 64x64 images), their output read back by data.load_jsonl, the
clear one-line error a malformed row gives, the pure-Python TFRecord reader, the pair benchmarks
and their scoring, the command line, and sft.py training two steps on a converted set.

    python -m pytest tests/test_rating_sets.py -q        # the parquet tests need pyarrow
"""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from data import load_jsonl
from rating_sets import agiqa3k, evalmuse, genai_bench, imagereward, richhf
from rating_sets.shared import is_test, to_grid
from rating_sets.pairs import (aggregate_mu, convert_hpdv2, convert_hpdv3, convert_imagereward, convert_pickapic,
                               load_pairs, pair_accuracy, rank_pairs)
from rating_sets.tfrecord import _crc32c_py, crc32c, read_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "rating_sets")


def image_bytes(seed, fmt="PNG"):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path, seed, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(ext, "PNG")
    with open(path, "wb") as f:
        f.write(image_bytes(seed, fmt))


def load_both(out):
    train, test = load_jsonl(os.path.join(out, "train.jsonl")), load_jsonl(os.path.join(out, "test.jsonl"))
    assert train and test
    return train, test


# -----------------------------------------------------------------------------
# the scale rule and the split

def test_scale_rule_maps_linearly_and_snaps_to_half_points():
    assert [to_grid(x, 1, 7, "w") for x in range(1, 8)] == [1.0, 1.5, 2.5, 3.0, 3.5, 4.5, 5.0]
    assert [to_grid(x, 1, 5, "w") for x in range(1, 6)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert to_grid(0.5, 0, 1, "w") == 3.0 and to_grid(0.3, 0, 1, "w") == 2.0  # 2.2 -> 2.0
    assert to_grid(0.3125, 0, 1, "w") == 2.5  # 2.25: a half rounds up
    assert to_grid("2.6", 0, 5, "w") == 3.0  # MOS 2.6 -> 3.08 -> 3.0; CSV text is read as a number
    for bad in (8, 0, float("nan"), "x", None, True):
        with pytest.raises(ValueError, match=r"^f\.json row 3: "):
            to_grid(bad, 1, 7, "f.json row 3")


def test_split_by_prompt_is_deterministic_and_near_the_fraction():
    prompts = [f"prompt number {i}" for i in range(2000)]
    first = [is_test(p, 0.1) for p in prompts]
    assert first == [is_test(p, 0.1) for p in prompts]
    assert 0.07 < sum(first) / len(first) < 0.13
    assert not any(is_test(p, 0.0) for p in prompts) and all(is_test(p, 1.0) for p in prompts)


# -----------------------------------------------------------------------------
# TFRecord: a tiny encoder of framing and tf.train.Example, written here independently

def _crc(data):
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


def _masked(data):
    c = _crc(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(values, packed=True):
    if isinstance(values[0], bytes):
        return _ld(1, b"".join(_ld(1, v) for v in values))
    if isinstance(values[0], float):
        inner = _ld(1, struct.pack(f"<{len(values)}f", *values)) if packed else \
            b"".join(_varint(1 << 3 | 5) + struct.pack("<f", v) for v in values)
        return _ld(2, inner)
    ints = [v & (1 << 64) - 1 for v in values]
    if packed:
        inner = _ld(1, b"".join(_varint(v) for v in ints))
    else:
        inner = b"".join(_varint(1 << 3) + _varint(v) for v in ints)
    return _ld(3, inner)


def _example(features, packed=True):
    return _ld(1, b"".join(_ld(1, _ld(1, k.encode()) + _ld(2, _feature(v, packed))) for k, v in features.items()))


def _frame(data):
    n = struct.pack("<Q", len(data))
    return n + struct.pack("<I", _masked(n)) + data + struct.pack("<I", _masked(data))


def write_tfrecord(path, examples, packed=True):
    with open(path, "wb") as f:
        for ex in examples:
            f.write(_frame(_example(ex, packed)))


def test_crc32c_check_value():
    assert _crc(b"123456789") == 0xE3069283
    assert _crc32c_py(b"123456789") == 0xE3069283 and crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("packed", [True, False])
def test_tfrecord_reader_decodes_examples(tmp_path, packed):
    path = str(tmp_path / "x.tfrecord")
    exs = [{"name": [b"a.png"], "score": [0.25, 0.5], "n": [3, -2, 1 << 40]}, {"empty_bytes": [b""], "f": [1.5]}]
    write_tfrecord(path, exs, packed=packed)
    got = list(read_examples(path))
    assert [i for i, _ in got] == [0, 1]
    assert got[0][1] == {"name": [b"a.png"], "score": [0.25, 0.5], "n": [3, -2, 1 << 40]}
    assert got[1][1] == {"empty_bytes": [b""], "f": [1.5]}


def test_tfrecord_bad_frames_name_the_file_and_row(tmp_path):
    path = str(tmp_path / "x.tfrecord")
    write_tfrecord(path, [{"a": [1.0]}, {"b": [2.0]}, {"c": [3.0]}])
    data = open(path, "rb").read()
    one = len(_frame(_example({"a": [1.0]})))
    corrupt = bytearray(data)
    corrupt[one + 14] ^= 0xFF  # a payload byte of the second record
    open(path, "wb").write(bytes(corrupt))
    with pytest.raises(ValueError, match=r"x\.tfrecord row 1: bad TFRecord frame: the record's checksum"):
        list(read_examples(path))
    open(path, "wb").write(data[:-3])  # the last record's checksum cut short
    with pytest.raises(ValueError, match=r"x\.tfrecord row 2: bad TFRecord frame: the file ends before"):
        list(read_examples(path))
    open(path, "wb").write(data[:one] + b"\x07" * 12)  # garbage where the second header should be
    with pytest.raises(ValueError, match=r"row 1: bad TFRecord frame: the length's checksum"):
        list(read_examples(path))


# -----------------------------------------------------------------------------
# RichHF-18K: TFRecords + Pick-a-Pic images (a folder of files with prompts, or parquet shards)

RICHHF = {  # split: [(uid, prompt, aesthetics, artifact, misalignment)]
    "train": [("u-train-0", "a cat on a skateboard", 0.5, 0.75, 1.0),
              ("u-train-1", "a cat on a skateboard", 0.25, 0.0, 0.375)],
    "dev": [("u-dev-0", "a green teapot", 1.0, 1.0, 0.5)],
    "test": [("u-test-0", "a house made of cheese", 0.0, 0.5, 0.75),
             ("u-test-1", "a mountain lake", 0.625, 0.25, 0.125)],
}


def write_richhf(src, packed=True, bad=None):
    os.makedirs(src, exist_ok=True)
    heat = image_bytes(99)
    for split, rows in RICHHF.items():
        exs = []
        for uid, _, aes, art, mis in rows:
            ex = {"filename": [f"{uid}.png".encode()], "aesthetics_score": [aes], "artifact_score": [art],
                  "misalignment_score": [mis], "overall_score": [0.5], "artifact_map": [heat],
                  "misalignment_map": [heat], "prompt_misalignment_label": [b"1 1 0 1"]}
            exs.append(ex)
        if bad and split == bad[0]:
            exs[bad[1]] = bad[2](exs[bad[1]])
        write_tfrecord(os.path.join(src, f"{split}.tfrecord"), exs, packed)


def test_richhf_with_image_files_and_prompts(tmp_path):
    src, images, out = str(tmp_path / "richhf-18k"), str(tmp_path / "pickapic"), str(tmp_path / "out")
    write_richhf(src, packed=False)
    prompts = {}
    for k, (uid, prompt, *_) in enumerate(r for rows in RICHHF.values() for r in rows):
        write_image(os.path.join(images, f"{uid}.jpg"), k)  # found by uid, whatever the extension
        prompts[uid] = prompt
    with open(tmp_path / "prompts.json", "w") as f:
        json.dump(prompts, f)
    counts = richhf.convert(src, out, images=images, prompts=str(tmp_path / "prompts.json"))
    assert counts == {"train": 9, "test": 6}  # train + dev, three dimensions each
    train, test = load_both(out)
    got = {(r["id"].split("-", 1)[1].rsplit("-", 1)[0], r["dimension"]): r["score"] for r in train + test}
    # [0, 1] -> 1 + 4 x, snapped: 0.75 -> 4.0, 0.375 -> 2.5, 0.625 -> 3.5, 0.125 -> 1.5
    assert got[("train-u-train-0", "aesthetics")] == 3.0 and got[("train-u-train-0", "plausibility")] == 4.0
    assert got[("train-u-train-0", "alignment")] == 5.0 and got[("train-u-train-1", "alignment")] == 2.5
    assert got[("test-u-test-1", "aesthetics")] == 3.5 and got[("test-u-test-1", "alignment")] == 1.5
    assert {r["prompt"] for r in test} == {"a house made of cheese", "a mountain lake"}
    assert all("scores" not in r for r in train + test)


def test_richhf_errors_name_the_row(tmp_path):
    src = str(tmp_path / "src")
    images = str(tmp_path / "img")
    os.makedirs(images)
    write_richhf(src, bad=("dev", 0, lambda ex: {k: v for k, v in ex.items() if k != "artifact_score"}))
    with pytest.raises(ValueError, match=r"dev\.tfrecord row 0: missing float feature 'artifact_score'"):
        richhf.convert(src, str(tmp_path / "out"), images=images, prompts="unused.json")
    write_richhf(src, bad=("test", 1, lambda ex: {**ex, "misalignment_score": [1.5]}))
    with pytest.raises(ValueError, match=r"test\.tfrecord row 1: misalignment_score 1\.5 is outside"):
        richhf.convert(src, str(tmp_path / "out"), images=images, prompts="unused.json")
    with pytest.raises(ValueError, match="richhf needs --images"):
        richhf.convert(src, str(tmp_path / "out"))


def write_pickapic_shard(path, rows, v2=False):
    """rows: [(caption, (uid0, bytes0), (uid1, bytes1), label_0, label_1)] in Pick-a-Pic's published columns"""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = len(rows)
    cols = {
        "are_different": [True] * n, "best_image_uid": [r[1][0] if r[3] >= r[4] else r[2][0] for r in rows],
        "caption": [r[0] for r in rows], "created_at": pa.array([0] * n, pa.timestamp("ns")),
        "has_label": [True] * n, "image_0_uid": [r[1][0] for r in rows], "image_0_url": ["https://x/0"] * n,
        "image_1_uid": [r[2][0] for r in rows], "image_1_url": ["https://x/1"] * n,
        "jpg_0": pa.array([r[1][1] for r in rows], pa.binary()),
        "jpg_1": pa.array([r[2][1] for r in rows], pa.binary()),
        "label_0": pa.array([float(r[3]) for r in rows], pa.float64()),
        "label_1": pa.array([float(r[4]) for r in rows], pa.float64()),
        "model_0": ["sdxl"] * n, "model_1": ["sd21"] * n, "ranking_id": list(range(100, 100 + n)),
        "user_id": [7] * n, "num_example_per_prompt": [1] * n, "__index_level_0__": list(range(n)),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols), path)


def test_richhf_with_pickapic_parquet_shards(tmp_path):
    src, images, out = str(tmp_path / "src"), str(tmp_path / "pickapic_v1" / "data"), str(tmp_path / "out")
    write_richhf(src)
    flat = [r for rows in RICHHF.values() for r in rows]
    rows = [(flat[k][1], (flat[k][0], image_bytes(k, "JPEG")), (f"other-{k}", image_bytes(50 + k, "JPEG")), 1, 0)
            for k in range(len(flat))]
    write_pickapic_shard(os.path.join(images, "train-00000-of-00002.parquet"), rows[:3])
    write_pickapic_shard(os.path.join(images, "test-00000-of-00001.parquet"), rows[3:])
    assert richhf.convert(src, out, images=str(tmp_path / "pickapic_v1")) == {"train": 9, "test": 6}
    train, test = load_both(out)
    assert train[0]["image"].startswith("images/richhf/train/") and train[0]["image"].endswith(".jpg")


# -----------------------------------------------------------------------------
# EvalMuse-40K: train_list.json

def evalmuse_src(tmp_path, edit=None):
    src = tmp_path / "EvalMuse"
    src.mkdir(exist_ok=True)
    rows = json.load(open(os.path.join(FIXTURES, "evalmuse_train_list.json")))
    for k, r in enumerate(rows):
        write_image(str(src / r["img_path"]), k)
    if edit:
        edit(rows)
    with open(src / "train_list.json", "w") as f:
        json.dump(rows, f, indent=4)
    return str(src)


def test_evalmuse_converts_per_annotator_ratings(tmp_path):
    out = str(tmp_path / "out")
    assert evalmuse.convert(evalmuse_src(tmp_path), out, test_frac=0.5) == {"train": 4, "test": 2}
    train, test = load_both(out)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    r = next(r for r in train + test if r["image"].endswith("00001_playground.png"))
    assert r["scores"] == [2.0, 3.0, 2.0] and r["score"] == 2.0 and r["dimension"] == "alignment"
    assert r["group"] == "evalmuse-00001" and r["image"] == "../EvalMuse/images/00001_playground.png"


def test_evalmuse_malformed_rows(tmp_path):
    def rating(rows):
        rows[2]["total_score"] = [5, 6, 4]

    def no_prompt(rows):
        del rows[4]["prompt"]

    def no_image(rows):
        rows[1]["img_path"] = "images/missing.png"

    for edit, msg in [(rating, r"train_list\.json row 2: total_score rating 6 is outside the set's scale \[1, 5\]"),
                      (no_prompt, r"train_list\.json row 4: missing field 'prompt'"),
                      (no_image, r"train_list\.json row 1: image file not found: .*missing\.png")]:
        with pytest.raises(ValueError, match=msg):
            evalmuse.convert(evalmuse_src(tmp_path, edit), str(tmp_path / "out"), test_frac=0.5)
    with pytest.warns(UserWarning, match=r"1 rows skipped .* row 1: image file not found"):
        counts = evalmuse.convert(evalmuse_src(tmp_path, no_image), str(tmp_path / "out"), test_frac=0.5,
                                  skip_bad_images=True)
    assert counts["skipped"] == 1 and counts["train"] + counts["test"] == 5


# -----------------------------------------------------------------------------
# AGIQA-3K: data.csv

def agiqa_src(tmp_path, lines=None):
    src = tmp_path / "AGIQA-3K"
    (src / "AGIQA-3K").mkdir(parents=True, exist_ok=True)
    text = open(os.path.join(FIXTURES, "agiqa3k_data.csv")).read().splitlines()
    for k, line in enumerate(text[1:]):
        write_image(str(src / "AGIQA-3K" / line.split(",")[0]), k)
    if lines:
        text = lines(text)
    (src / "data.csv").write_text("\n".join(text) + "\n")
    return str(src)


def test_agiqa3k_converts_mos(tmp_path):
    out = str(tmp_path / "out")
    assert agiqa3k.convert(agiqa_src(tmp_path), out, test_frac=0.5) == {"train": 12, "test": 4}
    train, test = load_both(out)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    recs = {r["id"]: r for r in train + test}
    # mos 3.912 -> 1 + 0.8 * 3.912 = 4.13 -> 4.0; mos_align 0.523 -> 1.42 -> 1.5
    assert recs["agiqa3k-midjourney_normal_000-realism"]["score"] == 4.0
    assert recs["agiqa3k-AttnGAN_normal_000-alignment"]["score"] == 1.5
    assert {r["dimension"] for r in train + test} == {"alignment", "realism"}
    assert recs["agiqa3k-xl2.2_normal_002-alignment"]["prompt"] == "a lighthouse at dusk, anime style"
    out2 = str(tmp_path / "out2")
    agiqa3k.convert(agiqa_src(tmp_path), out2, test_frac=0.5, copy_images=True,
                    quality_dims=("realism", "aesthetics"))
    train, test = load_both(out2)
    assert len(train) + len(test) == 24 and train[0]["image"].startswith("images/agiqa3k/")


def test_agiqa3k_malformed_rows(tmp_path):
    def out_of_range(text):
        text[3] = text[3].replace("1.251234567", "5.2")
        return text

    def empty(text):
        text[5] = text[5].replace("0.951234567", "")
        return text

    def missing_image(text):
        text[8] = text[8].replace("glide_normal_003.jpg", "glide_normal_999.jpg")
        return text

    for edit, msg in [(out_of_range, r"data\.csv row 2 \(line 4\): mos_quality 5\.2 is outside the set's scale \[0, 5"),
                      (empty, r"data\.csv row 4 \(line 6\): missing field 'mos_quality'"),
                      (missing_image, r"data\.csv row 7 \(line 9\): image file not found: .*glide_normal_999\.jpg")]:
        with pytest.raises(ValueError, match=msg):
            agiqa3k.convert(agiqa_src(tmp_path, edit), str(tmp_path / "out"), test_frac=0.5)


# -----------------------------------------------------------------------------
# GenAI-Bench: parquet with embedded images, both schemas

GENAI = [  # (prompt, {generator: ratings})
    ("a blue cube on top of a red sphere", {"DALLE_3": [5, 4, 5], "SDXL_Base": [2, 3, 2]}),
    ("three apples and no oranges", {"DALLE_3": [3, 3, 4], "SDXL_Base": [1, 2, 1]}),
    ("a dog taller than the man beside it", {"DALLE_3": [4, 4, 4], "SDXL_Base": [3, 2, 2]}),
    ("the moon reflected in a teacup", {"DALLE_3": [5, 5, 5], "SDXL_Base": [4, 3, 4]}),
]


def _image_struct(pa, images):
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the datasets library's Image feature
    return pa.array([{"bytes": b, "path": None} for b in images], kind)


def write_genai_new(path, rows, start=0):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    gens = list(rows[0][1])
    cols = {
        "Index": pa.array(list(range(start, start + len(rows))), pa.int64()),
        "Prompt": [p for p, _ in rows],
        "Tags": pa.array([{"advanced": ["counting"], "basic": ["attribute"]}] * len(rows),
                         pa.struct([("advanced", pa.list_(pa.string())), ("basic", pa.list_(pa.string()))])),
        "HumanRatings": pa.array([r for _, r in rows], pa.struct([(g, pa.list_(pa.int64())) for g in gens])),
    }
    for k, g in enumerate(gens):
        cols[g] = _image_struct(pa, [image_bytes(10 * i + k) for i in range(len(rows))])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols), path)


def write_genai_old(path, rows, as_string=True):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    gens = list(rows[0][1])
    cols = {"id": [f"{i:05d}" for i in range(len(rows))], "prompt": [p for p, _ in rows],
            "basic_skills": ["['Attribute']"] * len(rows), "advanced_skills": ["['Counting']"] * len(rows)}
    for k, g in enumerate(gens):
        cols[g] = _image_struct(pa, [image_bytes(10 * i + k, "JPEG") for i in range(len(rows))])
    for g in gens:
        cols[g + "_HumanRating"] = [str(r[g]) if as_string else r[g] for _, r in rows]
    pq.write_table(pa.table(cols), path)


def test_genai_bench_current_schema(tmp_path):
    src, out = str(tmp_path / "GenAI-Bench"), str(tmp_path / "out")
    write_genai_new(os.path.join(src, "data", "train-00000-of-00002.parquet"), GENAI[:2])
    write_genai_new(os.path.join(src, "data", "train-00001-of-00002.parquet"), GENAI[2:], start=2)
    counts = genai_bench.convert(src, out, test_frac=0.5)
    assert counts["train"] + counts["test"] == 8 and counts["train"] and counts["test"]
    train, test = load_both(out)
    r = next(r for r in train + test if r["prompt"] == GENAI[0][0] and r["generator"] == "SDXL_Base")
    assert r["scores"] == [2.0, 3.0, 2.0] and r["dimension"] == "alignment" and r["image"].endswith(".png")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {r["group"] for r in train + test} == {f"genai_bench-{i}" for i in range(4)}


def test_genai_bench_earlier_schema_with_string_ratings(tmp_path):
    pytest.importorskip("pyarrow")
    src, out = str(tmp_path / "GenAI-Bench"), str(tmp_path / "out")
    os.makedirs(src)
    write_genai_old(os.path.join(src, "GenAI-Bench.parquet"), GENAI)
    assert genai_bench.convert(src, out, test_frac=0.5) == {"train": 2, "test": 6}
    train, test = load_both(out)
    assert sorted(r["scores"] for r in train + test if r["generator"] == "DALLE_3")[0] == [3.0, 3.0, 4.0]
    assert train[0]["image"].endswith(".jpg")
    assert genai_bench.parse_ratings("4, 5 3", "w", "c") == [4.0, 5.0, 3.0]


def test_genai_bench_malformed_rows(tmp_path):
    pytest.importorskip("pyarrow")
    src = str(tmp_path / "src")
    os.makedirs(src)
    bad = [GENAI[0], (GENAI[1][0], {"DALLE_3": [3, 6, 4], "SDXL_Base": [1, 2, 1]})]
    write_genai_old(os.path.join(src, "GenAI-Bench.parquet"), bad, as_string=False)
    with pytest.raises(ValueError, match=r"GenAI-Bench\.parquet row 1: DALLE_3_HumanRating rating 6 is outside"):
        genai_bench.convert(src, str(tmp_path / "out"), test_frac=0.5)
    write_genai_old(os.path.join(src, "GenAI-Bench.parquet"),
                    [GENAI[0], (GENAI[1][0], {"DALLE_3": "four, five", "SDXL_Base": [1, 2, 1]})])
    with pytest.raises(ValueError, match=r"row 1: DALLE_3_HumanRating 'four, five' is not a list of ratings"):
        genai_bench.convert(src, str(tmp_path / "out"), test_frac=0.5)


# -----------------------------------------------------------------------------
# ImageRewardDB: metadata parquets and image zips

IR = {  # split: [(prompt_id, prompt, [(uuid, rank, overall, alignment, fidelity)])]
    "train": [("001324-0093", "a magical forest, fantasy art",
               [("t1", 1, 6, 6, 6), ("t2", 2, 4, 5, 3), ("t3", 3, 2, 1, 2)]),
              ("000864-0061", "painting of a holy woman", [("t4", 1, 5, 7, 4), ("t5", 2, 3, 3, 3)])],
    "validation": [("000111-0001", "a snowy owl", [("v1", 1, 5, 5, 5), ("v2", 2, 4, 4, 4)])],
    "test": [("005658-0040", "deathly portal to the abyss",
              [("s1", 2, 3, 3, 2), ("s2", 1, 6, 6, 7), ("s3", 2, 3, 4, 2)])],
}


def write_imagereward(src, edit=None):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    os.makedirs(src, exist_ok=True)
    seed = 0
    for split, prompts in IR.items():
        rows = []
        folder = f"{split}_1"
        zpath = os.path.join(src, "images", split, folder + ".zip")
        os.makedirs(os.path.dirname(zpath), exist_ok=True)
        with zipfile.ZipFile(zpath, "w") as z:
            for pid, prompt, images in prompts:
                for uuid, rank, ov, al, fi in images:
                    seed += 1
                    rows.append({"image_path": f"images/{split}/{folder}/{uuid}.webp", "prompt_id": pid,
                                 "prompt": prompt, "classification": "Outdoor Scenes",
                                 "image_amount_in_total": len(images), "rank": rank, "overall_rating": ov,
                                 "image_text_alignment_rating": al, "fidelity_rating": fi})
                    if split == "validation":  # this zip already extracted in place
                        write_image(os.path.join(src, "images", split, folder, f"{uuid}.webp"), seed)
                    else:
                        z.writestr(f"{folder}/{uuid}.webp", image_bytes(seed, "WEBP"))
        if edit:
            edit(split, rows)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(src, f"metadata-{split}.parquet"))


def test_imagereward_converts_with_its_own_split(tmp_path):
    src, out = str(tmp_path / "ImageRewardDB"), str(tmp_path / "out")
    write_imagereward(src)
    assert imagereward.convert(src, out) == {"train": 21, "test": 9}  # (5 + 2) and 3 images, 3 dimensions each
    train, test = load_both(out)
    recs = {r["id"]: r for r in train + test}
    r = recs["imagereward-train-t2-alignment"]
    assert r["scores"] == [3.5] and r["group"] == "imagereward-001324-0093" and r["raw"]["rank"] == 2
    assert recs["imagereward-train-t2-plausibility"]["scores"] == [2.5]  # fidelity 3 of 7
    assert recs["imagereward-train-t2-realism"]["scores"] == [2.5]
    assert recs["imagereward-test-s2-plausibility"]["score"] == 5.0
    assert recs["imagereward-train-t1-alignment"]["image"] == "images/imagereward/train/t1.webp"  # from the zip
    assert recs["imagereward-validation-v1-alignment"]["image"].startswith("../ImageRewardDB/images/validation/")


def test_imagereward_malformed_rows(tmp_path):
    src = str(tmp_path / "src")

    def rating(split, rows):
        if split == "test":
            rows[1]["image_text_alignment_rating"] = 8

    def image(split, rows):
        if split == "train":
            rows[3]["image_path"] = "images/train/train_1/nope.webp"

    write_imagereward(src, rating)
    with pytest.raises(ValueError, match=r"metadata-test\.parquet row 1: image_text_alignment_rating 8 is outside"):
        imagereward.convert(src, str(tmp_path / "out"))
    write_imagereward(src, image)
    with pytest.raises(ValueError, match=r"metadata-train\.parquet row 3: nope\.webp is not in .*train_1\.zip"):
        imagereward.convert(src, str(tmp_path / "out"))
    with pytest.warns(UserWarning, match="1 rows skipped"):
        counts = imagereward.convert(src, str(tmp_path / "out"), skip_bad_images=True)
    assert counts == {"train": 18, "test": 9, "skipped": 1}
    os.remove(os.path.join(src, "metadata-test.parquet"))
    with pytest.raises(ValueError, match=r"metadata-test\.parquet not found"):
        imagereward.convert(src, str(tmp_path / "out"))


# -----------------------------------------------------------------------------
# pairs

def test_rank_pairs_skip_ties():
    assert rank_pairs([2, 1, 2]) == [(0, 1, "b"), (1, 2, "a")]


def test_hpdv2_and_hpdv3_pairs(tmp_path):
    src = tmp_path / "HPDv2"
    src.mkdir()
    shutil.copy(os.path.join(FIXTURES, "hpdv2_test.json"), src / "test.json")
    for k in range(5):
        write_image(str(src / "test" / f"{k:05d}.jpg"), k)
    out = str(tmp_path / "pairs" / "hpdv2.jsonl")
    assert convert_hpdv2(str(src), out) == {"pairs": 3}
    pairs = load_pairs(out)
    assert [(p["image_a"][-9:], p["image_b"][-9:], p["preferred"]) for p in pairs] == [
        ("00000.jpg", "00001.jpg", "b"), ("00001.jpg", "00002.jpg", "a"), ("00003.jpg", "00004.jpg", "b")]

    src3 = tmp_path / "HPDv3"
    src3.mkdir()
    shutil.copy(os.path.join(FIXTURES, "hpdv3_test.json"), src3 / "test.json")
    for k, row in enumerate(json.load(open(src3 / "test.json"))):
        write_image(str(src3 / row["path1"]), k)
        write_image(str(src3 / row["path2"]), 10 + k)
    out3 = str(tmp_path / "pairs" / "hpdv3.jsonl")
    assert convert_hpdv3(str(src3 / "test.json"), out3) == {"pairs": 3}
    pairs = load_pairs(out3)
    assert [p["preferred"] for p in pairs] == ["a", "b", "a"]
    assert all("/flux/" in p["image_a"] for p in pairs[:1]) and "/mj/" in pairs[1]["image_b"]


def test_imagereward_pairs_from_test_json_and_parquet(tmp_path):
    imgs = tmp_path / "test_images"
    rows = json.load(open(os.path.join(FIXTURES, "imagereward_test.json")))
    for k, p in enumerate(q for r in rows for q in r["generations"]):
        write_image(str(imgs / p), k)
    out = str(tmp_path / "ir.jsonl")
    assert convert_imagereward(os.path.join(FIXTURES, "imagereward_test.json"), out, images=str(imgs)) == {"pairs": 3}
    assert [p["preferred"] for p in load_pairs(out)] == ["a", "b", "b"]

    pytest.importorskip("pyarrow")
    src = str(tmp_path / "ImageRewardDB")
    write_imagereward(src)
    out = str(tmp_path / "ir2.jsonl")
    assert convert_imagereward(src, out) == {"pairs": 2}  # ranks 2, 1, 2: two untied pairs
    pairs = load_pairs(out)
    assert [p["preferred"] for p in pairs] == ["b", "a"] and pairs[0]["image_b"].endswith("s2.webp")


def test_pickapic_pairs_leave_ties_out(tmp_path):
    rows = [("a red fox", ("u0", image_bytes(0, "JPEG")), ("u1", image_bytes(1, "JPEG")), 1, 0),
            ("a tall tower", ("u2", image_bytes(2, "JPEG")), ("u3", image_bytes(3, "JPEG")), 0.5, 0.5),
            ("a small boat", ("u4", image_bytes(4, "JPEG")), ("u5", image_bytes(5, "JPEG")), 0, 1)]
    src = str(tmp_path / "pickapic_v2" / "data")
    write_pickapic_shard(os.path.join(src, "test_unique-00000-of-00001-abc.parquet"), rows)
    out = str(tmp_path / "pickapic.jsonl")
    assert convert_pickapic(str(tmp_path / "pickapic_v2"), out) == {"pairs": 2}
    pairs = load_pairs(out)
    assert [(p["prompt"], p["preferred"]) for p in pairs] == [("a red fox", "a"), ("a small boat", "b")]
    write_pickapic_shard(os.path.join(src, "test_unique-00000-of-00001-abc.parquet"), rows[:1] + [rows[1][:3] + (1, 1)])
    with pytest.raises(ValueError, match=r"test_unique-00000-of-00001-abc\.parquet row 1: labels \(1\.0, 1\.0\)"):
        convert_pickapic(src, out)


def test_load_pairs_names_the_bad_line(tmp_path):
    write_image(str(tmp_path / "x.png"), 0)
    write_image(str(tmp_path / "y.png"), 1)
    good = {"id": "p0", "prompt": "a cat", "image_a": "x.png", "image_b": "y.png", "preferred": "a"}
    for bad, msg in [({**good, "id": "p1", "preferred": "c"}, r"pairs\.jsonl:2: preferred must be \"a\" or \"b\""),
                     ({**good, "id": "p1", "image_b": "z.png"}, r"pairs\.jsonl:2: image_b: image file not found"),
                     ({k: v for k, v in good.items() if k != "prompt"}, r"pairs\.jsonl:2: missing keys \['prompt'\]"),
                     (good, r"pairs\.jsonl:2: duplicate id 'p0' \(first on line 1\)")]:
        (tmp_path / "pairs.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=msg):
            load_pairs(str(tmp_path / "pairs.jsonl"))


def test_pair_accuracy_and_aggregate_mu_by_hand():
    # pairs: a wins (right), b wins but a scored higher (wrong), a tie in mu (half), b wins (right)
    assert pair_accuracy([3.0, 4.0, 2.5, 1.0], [2.0, 3.5, 2.5, 4.0], ["a", "b", "b", "b"]) == pytest.approx(2.5 / 4)
    assert pair_accuracy(np.array([1.0]), np.array([2.0]), np.array(["a"])) == 0.0
    with pytest.raises(ValueError, match="preferred must be 'a' or 'b'"):
        pair_accuracy([1.0], [2.0], ["x"])
    with pytest.raises(ValueError, match="non-finite"):
        pair_accuracy([float("nan")], [2.0], ["a"])
    per_dim = {"alignment": [4.0, 2.0], "realism": [2.0, 2.0], "aesthetics": [3.0, 5.0], "plausibility": [5.0, 3.0]}
    assert aggregate_mu(per_dim).tolist() == [3.5, 3.0]  # (4+2+3+5)/4, (2+2+5+3)/4
    w = {"alignment": 2.0, "realism": 1.0, "aesthetics": 1.0}  # plausibility weighs 0
    assert aggregate_mu(per_dim, w).tolist() == [3.25, 2.75]  # (8+2+3)/4, (4+2+5)/4
    with pytest.raises(ValueError, match="unknown dimensions"):
        aggregate_mu({"beauty": [1.0]})
    with pytest.raises(ValueError, match="non-negative"):
        aggregate_mu(per_dim, {"alignment": -1.0})


# -----------------------------------------------------------------------------
# the command line

def _cli(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_converts_and_reports_errors_in_one_line(tmp_path):
    src, out = agiqa_src(tmp_path), str(tmp_path / "out")
    res = _cli("rating_sets", "agiqa3k", "--src", src, "--out", out, "--test-frac", "0.5")
    assert res.returncode == 0, res.stderr
    assert "agiqa3k: 12 train and 4 test records" in res.stdout
    res = _cli("rating_sets", "agiqa3k", "--src", src, "--out", out, "--prompts", "p.json")
    assert res.returncode == 2 and res.stderr == "error: --prompts does not apply to agiqa3k\n"
    bad = agiqa_src(tmp_path, lambda t: t[:2] + [t[2].replace("3.701234567", "-1")] + t[3:])
    res = _cli("rating_sets", "agiqa3k", "--src", bad, "--out", out, "--test-frac", "0.5")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: ") and "data.csv row 1 (line 3): mos_align -1 is outside" in res.stderr
    (tmp_path / "genai").mkdir()
    (tmp_path / "genai" / "GenAI-Bench.parquet").write_bytes(b"PAR1")
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules['pyarrow'] = None; "
                          "from rating_sets.__main__ import main; sys.exit(main(sys.argv[1:]))",
                          "genai_bench", "--src", str(tmp_path / "genai"), "--out", out], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert res.returncode == 2 and res.stderr == "error: reading parquet files needs pyarrow: pip install pyarrow\n"
    res = _cli("rating_sets", "nosuchset", "--src", src, "--out", out)
    assert res.returncode == 2 and "unknown rating set 'nosuchset'" in res.stderr
    res = _cli("rating_sets.pairs", "hpdv2", "--src", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.jsonl"))
    assert res.returncode == 2 and res.stderr.startswith("error: --src") and res.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["agiqa3k", "evalmuse"])
def test_sft_trains_two_steps_on_a_converted_set(tmp_path, name):
    out = str(tmp_path / name)
    if name == "agiqa3k":
        agiqa3k.convert(agiqa_src(tmp_path), out, test_frac=0.5)
    else:
        evalmuse.convert(evalmuse_src(tmp_path), out, test_frac=0.5)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--data", out, "--out",
                          str(tmp_path / "x.safetensors"), "--steps", "2", "--batch-size", "2", "--micro-batch", "2",
                          "--eval-every", "0", "--eval-limit", "4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert os.path.isfile(tmp_path / "x.safetensors")
