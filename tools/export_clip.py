"""Export the CLIP model of a latentloom checkpoint as an open_clip folder (config + safetensors).

    python tools/export_clip.py outputs/shapes_clip/<run>/checkpoints/last.ckpt --out exported/clip

Load the result with ``open_clip.create_model("local-dir:exported/clip")``.
"""

from __future__ import annotations

import argparse
import sys

from trainer.errors import UserError
from trainer.models.clip import export_clip_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint (.ckpt) written by a CLIP run")
    parser.add_argument("--out", required=True, help="folder to write open_clip_config.json and the weights into")
    args = parser.parse_args(argv)
    try:
        out = export_clip_checkpoint(args.checkpoint, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (open_clip.create_model('local-dir:{out}'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
