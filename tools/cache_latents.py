"""Encode shards once into latents (and optionally text embeddings) for the diffusion stage.

    python tools/cache_latents.py --autoencoder outputs/shapes_autoencoder/latest/export/autoencoder.safetensors \
        --text-encoder outputs/shapes_clip/latest/export/clip \
        --urls data/shapes/shards/train.manifest.json --image-size 64 --out data/shapes/latents

Then train on them: python -m trainer.train experiment=shapes_ldm data.train.urls=data/shapes/latents/train.manifest.json
The cache is tagged with hashes of the autoencoder (with its scale factor) and the text encoder; a
run whose frozen models differ refuses it.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainer.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", required=True, help="our autoencoder export, or an SD VAE file (+ --config)")
    parser.add_argument("--config", default=None, help="JSON of the autoencoder config, for files that carry none")
    parser.add_argument("--scale-factor", type=float, default=None, help="default: the one stored with the file")
    parser.add_argument("--text-encoder", default=None, help="also cache text embeddings from this CLIP export")
    parser.add_argument("--text-layer", default="last", choices=["last", "penultimate"])
    parser.add_argument("--urls", required=True, help="shards: brace pattern, list joined with ::, or a manifest")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--buckets",
        default=None,
        help='aspect-ratio buckets as JSON, e.g. \'{"max_area": 65536, "step": 64}\' (instead of --image-size squares)',
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        from trainer.checkpoints import load_vae_weights, read_vae_config
        from trainer.errors import ConfigError
        from trainer.latent_cache import cache_latents
        from trainer.models.autoencoder import AutoencoderKL
        from trainer.models.text_encoder import TextEncoder

        config = json.loads(args.config) if args.config else read_vae_config(args.autoencoder)
        if config is None:
            raise ConfigError(f"{args.autoencoder} carries no config: give --config (e.g. the kl_f8 dict as JSON)")
        autoencoder = AutoencoderKL.from_config(config)
        stored = load_vae_weights(autoencoder, args.autoencoder)
        scale = args.scale_factor or stored
        if scale is None:
            raise ConfigError("no scale factor stored with the autoencoder: give --scale-factor (SD: 0.18215)")
        text_encoder = TextEncoder.from_source(args.text_encoder, layer=args.text_layer) if args.text_encoder else None
        try:
            buckets = json.loads(args.buckets) if args.buckets else None
        except ValueError as error:
            raise ConfigError(f"--buckets is not valid JSON ({error}); e.g. '{{\"max_area\": 65536}}'") from None
        manifest = cache_latents(
            args.urls,
            args.out,
            autoencoder,
            scale,
            text_encoder=text_encoder,
            image_size=args.image_size,
            batch_size=args.batch_size,
            samples_per_shard=args.samples_per_shard,
            prefix=args.prefix,
            device=args.device,
            buckets=buckets,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"cached {manifest['total']} samples in {len(manifest['shards'])} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
