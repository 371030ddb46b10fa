"""Measure an autoencoder's latent scale factor (1 / std of the latents, SD's 0.18215) over N samples
and store it with the checkpoint.

    python tools/scale_factor.py outputs/shapes_autoencoder/latest/checkpoints/last.ckpt \
        --urls data/shapes/shards/train.manifest.json --samples 2048 --image-size 64

The autoencoder task already measures it at every validation; use this tool for more samples, other
data, or a released VAE file (then the factor is printed and, with --write, stored in a safetensors
export's metadata). A .ckpt is rewritten atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from trainer.errors import ConfigError, UserError


@torch.no_grad()
def measure(autoencoder: torch.nn.Module, urls: str, samples: int, image_size: int, batch_size: int) -> float:
    from trainer.data.pipeline import ShardDataset, ShardLoader
    from trainer.data.transforms import ImageTransform

    dataset = ShardDataset(
        urls,
        batch_size=batch_size,
        transform=ImageTransform(image_size, normalize="symmetric"),
        require_caption=False,
        shuffle=False,
        name="scale_factor",
    )
    count, total, squares = 0, 0.0, 0.0
    for batch in ShardLoader(dataset):
        latents = autoencoder.encode(batch["image"]).sample().double()
        count, total, squares = (
            count + latents.numel(),
            total + latents.sum().item(),
            squares + latents.pow(2).sum().item(),
        )
        if count >= samples * latents[0].numel():
            break
    if count == 0:
        raise ConfigError(f"no samples read from {urls}")
    std = (squares / count - (total / count) ** 2) ** 0.5
    return 1.0 / std


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an autoencoder run's .ckpt, or an autoencoder .safetensors export")
    parser.add_argument("--urls", required=True, help="shards to measure on")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--config", default=None, help="JSON model config, for files that carry none")
    parser.add_argument("--write", action="store_true", help="store the factor in the file (default for .ckpt)")
    args = parser.parse_args(argv)
    try:
        import json

        from trainer.checkpoints import (
            export_vae,
            load_lightning_checkpoint,
            load_vae_weights,
            read_vae_config,
        )
        from trainer.models.autoencoder import AutoencoderKL

        path = Path(args.checkpoint)
        if path.suffix == ".ckpt":
            checkpoint = load_lightning_checkpoint(path)
            config = checkpoint.get("hyper_parameters", {}).get("model")
        else:
            checkpoint, config = None, json.loads(args.config) if args.config else read_vae_config(path)
        if config is None:
            raise ConfigError(f"{path} carries no autoencoder config: give --config")
        autoencoder = AutoencoderKL.from_config(config).eval()
        load_vae_weights(autoencoder, path)
        factor = measure(autoencoder, args.urls, args.samples, args.image_size, args.batch_size)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"scale_factor = {factor:.6f}  (latent std {1 / factor:.6f})")
    if checkpoint is not None:
        checkpoint["state_dict"]["scale_factor"] = torch.tensor(factor)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
        print(f"stored in {path}")
    elif args.write:
        export_vae(autoencoder, path, factor, config)
        print(f"stored in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
