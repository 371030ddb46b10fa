"""Sample images from a latent diffusion checkpoint: text to image, or image to image.

    python tools/sample.py outputs/shapes_ldm/latest/checkpoints/last.ckpt \
        --prompt "a small red circle in the top left" --prompt "a large blue square" \
        --negative-prompt "" --steps 30 --guidance 4 --sampler dpmpp_2m --seed 0 --batch 4 --out samples/
    python tools/sample.py CKPT --prompt "a green star" --init-image photo.png --strength 0.6 --out img2img/
    python tools/sample.py CKPT --prompt "a blue circle" --trajectory --out traj/   # also the image emerging from noise
    python tools/sample.py CKPT --prompt "a red star" --width 96 --height 64 --out wide/   # any shape at the stride

Writes NNNN.png per image, grid.png, prompts.jsonl (file, prompt, negative prompt, seed, and for prompts
that name a shapes figure's size, color, shape and position, those attributes, which
``python -m trainer.eval.shapes OUT`` scores the images against), and with
--trajectory a strip per image of the decoded latents at every step.

LoRA adapters (a LoRA run's export/lora.safetensors) are applied at sampling time with a weight each, all at once:

    python tools/sample.py CKPT --prompt "a red star" --lora style.safetensors:0.8 --lora subject.safetensors:0.5 --out lora/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a latent diffusion checkpoint (.ckpt) from a run folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from (default: the empty prompt)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--sampler", default="dpmpp_2m", help="ddpm, ddim, euler, euler_ancestral, dpmpp_2m")
    parser.add_argument("--schedule", default="karras", help="sigma schedule: karras or uniform")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    stride = "a multiple of the latent stride (autoencoder x UNet downsampling, e.g. 64 for SD)"
    parser.add_argument("--height", type=int, default=None, help=f"{stride}; default: the training resolution")
    parser.add_argument("--width", type=int, default=None, help=f"{stride}; default: the training resolution")
    parser.add_argument("--init-image", default=None, help="image-to-image: start from this image")
    parser.add_argument("--strength", type=float, default=0.75, help="image-to-image: how much to change (0..1)")
    parser.add_argument("--trajectory", action="store_true", help="also save each image's denoising trajectory")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="a LoRA adapter file and its weight (default 1; 0: no effect); repeat to combine several",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from torchvision.utils import make_grid

    from trainer.data.shapes import parse_caption
    from trainer.generate import load_checkpoint_pipeline
    from trainer.lora import parse_adapter_arg

    adapters = [parse_adapter_arg(text) for text in args.lora]
    pipeline = load_checkpoint_pipeline(args.checkpoint, use_ema=not args.no_ema, device=args.device, lora=adapters)
    prompts = [p for p in args.prompt for _ in range(args.batch)]
    seeds = [args.seed + i for i in range(len(prompts))]
    height = args.height or pipeline.resolution
    width = args.width or pipeline.resolution
    init = None
    if args.init_image:
        path = Path(args.init_image)
        if not path.is_file():
            print(f"error: init image {path} does not exist", file=sys.stderr)
            return 2
        picture = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        init = torch.from_numpy(np.asarray(picture)).permute(2, 0, 1).float().div(127.5).sub(1)
        init = init.unsqueeze(0).repeat(len(prompts), 1, 1, 1)
    steps_seen: list[torch.Tensor] = []

    def record(step: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        steps_seen.append(x.detach().cpu())

    images = pipeline.generate(
        prompts,
        negative_prompts=[args.negative_prompt] * len(prompts),
        height=height,
        width=width,
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
        schedule=args.schedule,
        seeds=seeds,
        init_images=init,
        strength=args.strength,
        callback=record if args.trajectory else None,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prompts.jsonl", "w") as index:
        for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
            name = f"{i:04d}.png"
            to_pil(image).save(out / name)
            record_line = {"file": name, "prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed}
            attributes = parse_caption(prompt)  # shapes prompts: what trainer.eval.shapes scores the image against
            if attributes is not None:
                record_line["attributes"] = attributes
            index.write(json.dumps(record_line) + "\n")
    grid = make_grid((images.float().cpu() + 1) / 2, nrow=min(len(images), 8))
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(out / "grid.png")
    if args.trajectory:
        for i in range(len(images)):
            frames = [pipeline.decode_latents(x[i : i + 1].to(pipeline.device))[0] for x in steps_seen] + [images[i]]
            strip = torch.cat([f.cpu() for f in frames], dim=2)  # frames side by side: (3, H, W * steps)
            to_pil(strip).save(out / f"{i:04d}_trajectory.png")
    print(f"wrote {len(images)} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
