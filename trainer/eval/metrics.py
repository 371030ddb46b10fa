"""Metrics for generated images on real data: CLIP score against their prompts, and FID.

- :func:`clip_score`: ``100 * max(cos(image embedding, text embedding), 0)`` averaged over pairs (the
  CLIPScore of Hessel et al. 2021, as torchmetrics computes it), with any open_clip model of ours or on
  disk (:func:`trainer.models.clip.load_clip`): our CLIP stage's export or checkpoint, or released weights.
- :func:`fid`: Fréchet Inception Distance through torchmetrics, whose Inception-v3 (torch-fidelity's
  FID network, ``pt_inception-2015-12-05-6726825d.pth``) must be a local file: nothing downloads.
  Another feature extractor (an ``nn.Module`` returning (N, D) features) may be given instead.

``python -m trainer.eval.metrics --help`` runs them over folders of images.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from trainer.errors import MissingDependencyError, MissingFileError, UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


def load_images(folder: str | Path) -> list[Image.Image]:
    """The images of a folder, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MissingFileError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [Image.open(p).convert("RGB") for p in paths]


def to_uint8_batch(images: Iterable[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8, resized to ``size`` x ``size`` when given (bicubic)."""
    arrays = []
    for image in images:
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def clip_score(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    clip_source: str | Path,
    name: str | None = None,
    batch_size: int = 64,
) -> float:
    """Mean CLIPScore of image/prompt pairs with the CLIP at ``clip_source`` (see module docstring)."""
    from trainer.models.clip import load_clip

    if len(images) != len(prompts):
        raise UserError(f"clip_score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
    model, tokenizer = load_clip(clip_source, name)
    model.eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = torch.tensor(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    scores = []
    for start in range(0, len(images), batch_size):
        pixels = to_uint8_batch(images[start : start + batch_size], size).float() / 255
        image_features = F.normalize(model.encode_image((pixels - mean) / std), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(list(prompts[start : start + batch_size]))), dim=-1)
        scores.append(100 * (image_features * text_features).sum(dim=-1).clamp_min(0))
    return torch.cat(scores).mean().item()


def inception_feature_extractor(weights: str | Path) -> int:
    """Check that FID's Inception weights are a local file and that torch-fidelity is installed; returns
    the feature size torchmetrics then builds its extractor with."""
    weights = Path(weights)
    if not weights.is_file():
        raise MissingFileError(
            f"FID needs the Inception-v3 weights as a local file, and {weights} does not exist. Download "
            f"{INCEPTION_FILE} once on a machine with network (it is torch-fidelity's FID Inception, from "
            "github.com/toshas/torch-fidelity/releases) and pass its path with --inception-weights."
        )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            "FID with the Inception network needs torch-fidelity: pip install 'latentloom[eval]'"
        ) from error
    return 2048


@torch.no_grad()
def fid(
    real: Sequence[Image.Image],
    fake: Sequence[Image.Image],
    inception_weights: str | Path | None = None,
    feature_extractor: nn.Module | None = None,
    batch_size: int = 50,
) -> float:
    """FID between two image sets, with torchmetrics' FrechetInceptionDistance (Inception weights from
    a local file) or with ``feature_extractor`` (images in as uint8 (N, 3, H, W), features (N, D) out)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    if feature_extractor is not None:
        width, height = real[0].size  # torchmetrics probes the extractor with one image of this size
        metric = FrechetInceptionDistance(feature=feature_extractor, input_img_size=(3, height, width))
        size = None
    elif inception_weights is not None:
        feature = inception_feature_extractor(inception_weights)
        metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=str(inception_weights))
        size = 299
    else:
        raise UserError("FID needs --inception-weights (a local file) or a feature extractor")
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(to_uint8_batch(images[start : start + batch_size], size), real=is_real)
    return metric.compute().item()


def read_prompts(path: str | Path, folder: Path) -> tuple[list[Image.Image], list[str]]:
    """Images and prompts of a ``prompts.jsonl`` (lines with ``file`` and ``prompt``, as the demo and
    ``tools/sample.py`` write) next to the images of ``folder``."""
    pairs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    missing = [p["file"] for p in pairs if not (folder / p["file"]).is_file()]
    if missing:
        raise MissingFileError(f"{len(missing)} images named in {path} are not in {folder}, e.g. {missing[0]}")
    return [Image.open(folder / p["file"]).convert("RGB") for p in pairs], [p["prompt"] for p in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CLIP score and FID of generated images.")
    parser.add_argument("images", type=Path, help="folder of generated images")
    parser.add_argument(
        "--prompts", type=Path, help="prompts.jsonl (file, prompt per line); default IMAGES/prompts.jsonl"
    )
    parser.add_argument("--clip", help="CLIP for the CLIP score: our export folder or checkpoint, or open_clip weights")
    parser.add_argument("--clip-name", help="open_clip model name, for a bare weights file")
    parser.add_argument("--real", type=Path, help="folder of real images for FID")
    parser.add_argument("--inception-weights", type=Path, help=f"local {INCEPTION_FILE} for FID")
    args = parser.parse_args(argv)
    try:
        report: dict[str, float | int] = {}
        if args.clip:
            images, prompts = read_prompts(args.prompts or args.images / "prompts.jsonl", args.images)
            report["clip_score"] = clip_score(images, prompts, args.clip, args.clip_name)
            report["pairs"] = len(images)
        if args.real:
            report["fid"] = fid(load_images(args.real), load_images(args.images), args.inception_weights)
        if not report:
            raise UserError("nothing to compute: give --clip (CLIP score) and/or --real with --inception-weights (FID)")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
