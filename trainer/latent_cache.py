"""Caching latents (and optionally text embeddings) as shards, so the diffusion stage skips the
frozen encoders: ``tools/cache_latents.py`` writes them, the data pipeline reads them back
(``latents.npy``, ``context.npy`` members instead of an image), and the training task refuses a
cache whose tags do not match its own frozen models.

Tags are hashes of the weights (and the latent scale factor): retraining or swapping the
autoencoder or the text encoder makes an old cache stale, and it is refused with a message instead
of silently training on latents of another model.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.data.pipeline import ShardDataset, ShardLoader
from trainer.data.shards import ShardWriter
from trainer.data.transforms import ImageTransform
from trainer.errors import ConfigError


def weights_digest(module: nn.Module, salt: str = "") -> str:
    digest = hashlib.sha256(salt.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_tag(autoencoder: nn.Module, scale_factor: float) -> str:
    return weights_digest(autoencoder, f"scale={scale_factor:.8g}")


def check_cache_tags(meta: dict[str, Any], expected_latent: str, expected_context: str | None) -> None:
    """Raise a clear error when a cached sample was made with other frozen models than ours."""
    for what, key, expected in (
        ("latents", "latent_tag", expected_latent),
        ("text embeddings", "context_tag", expected_context),
    ):
        if key in meta and expected is not None and meta[key] != expected:
            raise ConfigError(
                f"stale cache: its {what} were made with other weights (tag {meta[key]}, this run's is {expected}). "
                f"Re-run tools/cache_latents.py with this run's autoencoder and text encoder, or train on the image shards."
            )


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().numpy())
    return buffer.getvalue()


@torch.no_grad()
def cache_latents(
    urls: Any,
    out_dir: str | Path,
    autoencoder: nn.Module,
    scale_factor: float,
    *,
    text_encoder: nn.Module | None = None,
    image_size: int = 256,
    batch_size: int = 32,
    samples_per_shard: int = 1000,
    prefix: str = "train",
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
    buckets: Any = None,
) -> dict:
    """Encode every sample of ``urls`` once (center crop, the posterior's mode x scale factor) and
    write ``<out_dir>/<prefix>-NNNNNN.tar`` with ``latents.npy`` (+ ``context.npy``), caption and json.

    Note: latents are cached deterministically (the posterior's mode, one center crop), so training
    on them forgoes random crops and posterior sampling; cache several crops if that matters.
    With ``buckets`` (a :class:`~trainer.data.buckets.Buckets` or its config mapping) each image is fitted to its
    aspect-ratio bucket instead of ``image_size`` squares; a pipeline with ``buckets`` set batches such latents
    by their shape.
    """
    autoencoder = autoencoder.to(device).eval()
    tags = {"latent_tag": latent_tag(autoencoder, scale_factor)}
    if text_encoder is not None:
        text_encoder = text_encoder.to(device).eval()
        tags["context_tag"] = text_encoder.fingerprint()
    dataset = ShardDataset(
        urls,
        batch_size=batch_size,
        transform=ImageTransform(image_size, crop="center", normalize="symmetric"),
        require_caption=False,
        shuffle=False,
        name="cache_latents",
        buckets=buckets,
    )
    with ShardWriter(out_dir, prefix, samples_per_shard) as writer:
        for batch in ShardLoader(dataset):
            latents = autoencoder.encode(batch["image"].to(device)).mode() * scale_factor
            contexts = text_encoder.encode(batch["caption"]) if text_encoder is not None else None
            for i, key in enumerate(batch["key"]):
                extra = {"latents.npy": _npy(latents[i].to(dtype))}
                if contexts is not None:
                    extra["context.npy"] = _npy(contexts[i].to(dtype))
                writer.write_members(key, extra, batch["caption"][i], {**batch["meta"][i], **tags})
    return writer.manifest
