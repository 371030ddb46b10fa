"""Inspect webdataset shards: samples per shard, members per sample, broken samples, captions, a grid.

    python tools/inspect_shards.py shards/photos/train.manifest.json --grid grid.png
    python tools/inspect_shards.py 'shards/laion/{00000..00009}.tar' --captions 10 --json

URLS is anything a run's data.train.urls accepts: a brace pattern, several joined with '::', or a
<prefix>.manifest.json (whose sample counts are then checked). Faults are judged as the training
pipeline judges them: broken or missing image, missing caption, bad json, unreadable or truncated shard.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's trainer, installed or not

from trainer.data.inspect import format_summary, inspect_shards  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("urls", help="brace pattern, '::'-joined patterns, or a .manifest.json")
    parser.add_argument("--captions", type=int, default=5, help="how many captions to print (default: 5)")
    parser.add_argument("--grid", default=None, help="save a grid of sample images to this PNG")
    parser.add_argument("--grid-size", type=int, default=16, help="images in the grid (default: 16)")
    parser.add_argument("--grid-cell", type=int, default=160, help="pixels per grid image (default: 160)")
    parser.add_argument(
        "--grid-captions", action=argparse.BooleanOptionalAction, default=True, help="captions under grid images"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = inspect_shards(
            args.urls,
            captions=args.captions,
            grid=args.grid,
            grid_size=args.grid_size,
            grid_cell=args.grid_cell,
            grid_captions=args.grid_captions,
        )
    except (OSError, ValueError, TypeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
