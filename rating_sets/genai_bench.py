"""
GenAI-Bench (BaiqiL/GenAI-Bench on the Hugging Face hub; Apache-2.0): 1,600 prompts from
professional designers, each rendered by six generators (DALLE_3, DeepFloyd_I_XL_v1,
Midjourney_6, SDXL_2_1, SDXL_Base, SDXL_Turbo) and rated for text-image alignment on a 1-5
Likert scale by three annotators.

Files, as published (confirmed against the dataset card's dataset_info at its revisions):
  * current: data/train-000NN-of-00012.parquet, columns Index (int64), Prompt (string), Tags
    (struct of basic / advanced skill lists), HumanRatings (struct: one list<int64> per generator)
    and one image column per generator, named as the generator.
  * earlier: GenAI-Bench.parquet, columns id (string), prompt, basic_skills, advanced_skills, one
    image column per generator and GENERATOR_HumanRating; the ratings were a list of integers,
    then (commit "change tags and humanratings to string type") a string, read here as a JSON list
    or as numbers separated by commas or spaces.
  Image columns are the datasets library's Image feature: a struct {bytes, path}.

Mapping: every (prompt, generator) image gives one "alignment" record whose scores are the three
annotations (1-5 is already the target scale; each is checked and put on the grid). group: the
prompt's index, so the six generators' images of a prompt are ranked together. Split: the set has
a single split, so test is a hash of the prompt (--test-frac). Images are extracted to
OUT/images/genai_bench/INDEX_GENERATOR.EXT.
"""

import glob
import json
import os
import re

from rating_sets.shared import Writer, field, is_test, limited, parquet_columns, parquet_rows, to_grid

NAME = "genai_bench"
HUB_ID = "BaiqiL/GenAI-Bench"
LICENSE = "Apache-2.0"
SCALE = (1, 5)


def parquet_files(src):
    files = sorted(glob.glob(os.path.join(src, "**", "*.parquet"), recursive=True))
    if os.path.isfile(src) and src.endswith(".parquet"):
        files = [src]
    if not files:
        raise ValueError(f"{src}: no .parquet files (expected data/train-*.parquet or GenAI-Bench.parquet)")
    return files


def parse_ratings(value, where, column):
    """a ratings cell -> list of numbers: a list, or (the string-typed revision) its text"""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            parts = [p for p in re.split(r"[,\s]+", text.strip("[]()")) if p]
            try:
                value = [float(p) for p in parts]
            except ValueError:
                raise ValueError(f"{where}: {column} {text!r} is not a list of ratings") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: {column} must be a non-empty list of ratings, not {value!r}")
    return [to_grid(x, *SCALE, where, f"{column} rating") for x in value]


def _image_bytes(cell, where, column):
    # the datasets Image feature: {"bytes": ..., "path": ...}; plain bytes are accepted too
    if isinstance(cell, (bytes, bytearray)):
        return cell
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    raise ValueError(f"{where}: no image bytes in column {column!r}")


def rows(path):
    """yield (where, prompt id, prompt, [(generator, image bytes, annotations, cell as published)]) for
    both schemas"""
    columns = parquet_columns(path)
    new = "HumanRatings" in columns
    if not new and not any(c.endswith("_HumanRating") for c in columns):
        raise ValueError(f"{path}: neither a HumanRatings column nor GENERATOR_HumanRating columns "
                         f"(columns: {columns}); is this GenAI-Bench?")
    for i, row in parquet_rows(path):
        where = f"{path} row {i}"
        if new:
            pid, prompt = field(row, "Index", where), field(row, "Prompt", where, str)
            ratings = field(row, "HumanRatings", where, dict)
            gens = [(g, r) for g, r in ratings.items()]
        else:
            pid, prompt = field(row, "id", where), field(row, "prompt", where, str)
            gens = [(c[:-len("_HumanRating")], row[c]) for c in columns if c.endswith("_HumanRating")]
        items = []
        for gen, value in gens:
            column = "HumanRatings." + gen if new else gen + "_HumanRating"
            if value is None:
                raise ValueError(f"{where}: missing ratings {column}")
            scores = parse_ratings(value, where, column)
            if gen not in row:
                raise ValueError(f"{where}: ratings for {gen!r} but no image column {gen!r}")
            items.append((gen, _image_bytes(row[gen], where, gen), scores, value))
        yield where, pid, prompt, items


def convert(src, out, test_frac=0.1, limit=None, skip_bad_images=False):
    """GenAI-Bench parquet file(s) under src -> OUT/train.jsonl, OUT/test.jsonl, OUT/images/genai_bench"""
    w = Writer(out, NAME, skip_bad_images=skip_bad_images)
    source = (item for path in parquet_files(src) for item in limited(rows(path), limit))
    for where, pid, prompt, items in source:
        split = "test" if is_test(prompt, test_frac) else "train"
        stem_id = re.sub(r"[^\w.-]", "_", str(pid))
        for gen, data, scores, raw in items:
            image = w.images.from_bytes(data, f"{stem_id}_{gen}", f"{where} ({gen})")
            if image is None:
                continue
            w.add(split, f"{NAME}-{stem_id}-{gen}-alignment", prompt, image, "alignment", where,
                  scores=scores, group=f"{NAME}-{stem_id}", generator=gen, raw={"ratings": raw}, source=NAME)
    return w.close()
