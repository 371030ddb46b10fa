"""Turn your own images into webdataset shards (key.jpg, key.txt, key.json) with a manifest.

    python tools/make_shards.py photos/ --out shards/photos --max-side 768 --val-fraction 0.05
    python tools/make_shards.py captions.csv --out shards/mine --caption-column text --path-column file

INPUT is a folder of images with sidecar captions (a.jpg + a.txt, subfolders included) or a
.csv/.tsv/.jsonl/.parquet table of image paths and captions (relative paths are resolved against the
table's folder; other columns go into each sample's json). See data/custom/README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's trainer, installed or not

from trainer.data.ingest import IngestError, make_shards  # noqa: E402
from trainer.data.shards import IMAGE_FORMATS, manifest_path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="folder of images with .txt captions, or a .csv/.tsv/.jsonl/.parquet table")
    parser.add_argument("--out", required=True, help="folder to write the shards and manifests into")
    parser.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar (default: train)")
    parser.add_argument("--val-prefix", default="val", help="prefix of the validation shards (default: val)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="default: 1000")
    parser.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side is at most this")
    parser.add_argument("--format", default="jpg", choices=sorted(IMAGE_FORMATS), help="image format (default: jpg)")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality (default: 95)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images for validation shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    parser.add_argument("--caption-column", default="caption", help="table column with captions (default: caption)")
    parser.add_argument("--path-column", default="path", help="table column with image paths (default: path)")
    parser.add_argument(
        "--require-caption", action="store_true", help="skip images without a caption (default: empty caption)"
    )
    parser.add_argument("--workers", type=int, default=0, help="processes decoding and encoding (0: this one)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out with this prefix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        result = make_shards(
            args.input,
            args.out,
            prefix=args.prefix,
            val_prefix=args.val_prefix,
            samples_per_shard=args.samples_per_shard,
            max_side=args.max_side,
            image_format=args.format,
            quality=args.quality,
            val_fraction=args.val_fraction,
            seed=args.seed,
            caption_column=args.caption_column,
            path_column=args.path_column,
            require_caption=args.require_caption,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except IngestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result['written']} samples to {result['out_dir']}")
    for prefix, manifest in result["manifests"].items():
        shards = len(manifest["shards"])
        where = manifest_path(result["out_dir"], prefix)
        print(f"  {prefix}: {manifest['total']} samples in {shards} shard{'s' * (shards != 1)}: {where}")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} images (each reported above with its reason)")
    if result["uncaptioned"]:
        print(f"{result['uncaptioned']} images had no caption and got an empty one (--require-caption skips them)")
    print(f"train on them with: data.train.urls={manifest_path(result['out_dir'], args.prefix)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
