"""
python -m rating_sets NAME --src DOWNLOAD_FOLDER --out OUT_FOLDER [options]: convert one public
rating set into OUT/train.jsonl, OUT/test.jsonl and OUT/images (rating_sets/__init__.py).
"""

import argparse
import inspect
import os
import sys

import rating_sets

# command-line option -> convert() keyword; a set whose convert() lacks the keyword refuses the option
OPTIONS = (("images", "images"), ("prompts", "prompts"), ("test_frac", "test_frac"), ("limit", "limit"),
           ("copy_images", "copy_images"), ("skip_bad_images", "skip_bad_images"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m rating_sets", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("name", help=f"the set: {', '.join(rating_sets.SETS)}")
    p.add_argument("--src", help="the set's download folder (files as the set publishes them)")
    p.add_argument("--out", required=True, help="output folder: train.jsonl, test.jsonl, images/")
    p.add_argument("--images", help="folder of the set's images where they are not under --src "
                                    "(richhf: Pick-a-Pic v1 parquet shards or image files)")
    p.add_argument("--prompts", help="richhf with image files: JSON object from Pick-a-Pic uid to prompt")
    p.add_argument("--test-frac", type=float, default=None,
                   help="share of prompts in test.jsonl, for sets without a split of their own (default 0.1)")
    p.add_argument("--limit", type=int, default=None, help="read at most N rows of each source file")
    p.add_argument("--copy-images", action="store_true", default=None,
                   help="copy images that are on disk into OUT/images instead of referencing them")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="drop (and count) rows whose image is missing or unreadable instead of stopping")
    p.add_argument("--from-hub", action="store_true",
                   help="download the set with huggingface_hub.snapshot_download first (hub-hosted sets)")
    return p.parse_args(argv)


def from_hub(module):
    # a few lines on purpose: the hub's own cache and resume do the work
    if not module.HUB_ID:
        raise ValueError(f"{module.NAME} is not on the Hugging Face hub; download it and give --src")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("--from-hub needs huggingface_hub: pip install huggingface_hub") from None
    return snapshot_download(repo_id=module.HUB_ID, repo_type="dataset")


def main(argv=None):
    args = parse_args(argv)
    try:
        module = rating_sets.get(args.name)
        accepted = inspect.signature(module.convert).parameters
        opts = {}
        for flag, key in OPTIONS:
            value = getattr(args, flag)
            if value is None:
                continue
            if key not in accepted:
                raise ValueError(f"--{flag.replace('_', '-')} does not apply to {module.NAME}")
            opts[key] = value
        if args.test_frac is not None and not 0 < args.test_frac < 1:
            raise ValueError(f"--test-frac {args.test_frac} must be between 0 and 1")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit} must be at least 1")
        src = from_hub(module) if args.from_hub else args.src
        if src is None:
            raise ValueError("give --src (the download folder) or --from-hub")
        if not os.path.exists(src):
            raise ValueError(f"--src {src}: no such file or folder")
        counts = module.convert(src, args.out, **opts)
    except (ValueError, OSError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
        return 2
    extra = f", {counts['skipped']} rows skipped" if counts.get("skipped") else ""
    print(f"{module.NAME}: {counts['train']} train and {counts['test']} test records in {args.out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
