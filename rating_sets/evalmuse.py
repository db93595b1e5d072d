"""
EvalMuse-40K (DY-Evalab/EvalMuse on the Hugging Face hub; BSD-3-Clause): about 40K generated
images of 4K real and synthetic prompts with fine-grained image-text alignment annotations.

Files, as published (confirmed against the dataset card): train_list.json, a JSON list of
{prompt_id, prompt, type, img_path, total_score: [one 1-5 rating per annotator], element_score,
promt_meaningless, split_confidence, attribute_confidence, fidelity_label}, and the images in
images.zip.part-aa..af (cat them into images.zip and unzip: img_path is relative to the folder
that holds train_list.json). test.json's labels are not published, so only train_list.json is
read. An image is looked for at SRC/img_path, then IMAGES/img_path and IMAGES/its base name
(--images).

Mapping: total_score (overall image-text alignment) -> alignment, every annotator's rating kept in
scores (1-5 is already the target scale; each is checked and put on the grid). element_score and
the other fields are not used. group: prompt_id. Split: a hash of the prompt (--test-frac), since
the labeled part has one split.
"""

import os

from rating_sets.shared import Writer, field, find_file, is_test, json_value, limited, to_grid

NAME = "evalmuse"
HUB_ID = "DY-Evalab/EvalMuse"
LICENSE = "BSD-3-Clause"
SCALE = (1, 5)


def convert(src, out, images=None, test_frac=0.1, limit=None, copy_images=False, skip_bad_images=False):
    """EvalMuse-40K train_list.json (+ images) -> OUT/train.jsonl, OUT/test.jsonl"""
    path = os.path.join(src, "train_list.json") if os.path.isdir(src) else src
    root = os.path.dirname(path)
    w = Writer(out, NAME, copy_images=copy_images, skip_bad_images=skip_bad_images)
    for i, row in limited(enumerate(json_value(path, hint="EvalMuse-40K publishes train_list.json")), limit):
        where = f"{path} row {i}"
        prompt = field(row, "prompt", where, str)
        prompt_id = str(field(row, "prompt_id", where))
        img_path = field(row, "img_path", where, str)
        ratings = field(row, "total_score", where, list)
        if not ratings:
            raise ValueError(f"{where}: total_score is an empty list")
        scores = [to_grid(x, *SCALE, where, "total_score rating") for x in ratings]
        found = find_file(img_path, [root, images]) or find_file(os.path.basename(img_path), [images])
        image = w.images.from_file(found or os.path.join(root, img_path), where)
        if image is None:
            continue
        split = "test" if is_test(prompt, test_frac) else "train"
        w.add(split, f"{NAME}-{i:05d}-alignment", prompt, image, "alignment", where, scores=scores,
              group=f"{NAME}-{prompt_id}", raw={"total_score": ratings}, source=NAME)
    return w.close()
