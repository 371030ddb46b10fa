"""The frozen text encoder the latent diffusion UNet cross-attends to: an open_clip text tower
yielding per-token hidden states.

It comes from our CLIP stage (its run's ``export/clip`` folder or a checkpoint) or from an open_clip
weights file on disk. ``layer="last"`` takes the final block's output, ``"penultimate"`` the one
before it (as SD 2.x does); ``final_norm`` applies the tower's final LayerNorm to it, as both SD 1.x
(CLIP's ``last_hidden_state``) and SD 2.x (OpenCLIP penultimate + ``ln_final``) do.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.models.clip import load_clip

LAYERS = ("last", "penultimate")


class TextEncoder(nn.Module):
    """``encoder(tokens) -> (B, L, width)`` hidden states; ``encoder.encode(captions)`` tokenizes first.

    Only the text tower is kept (the image tower is dropped). Frozen: no gradients, eval mode.
    """

    def __init__(self, clip: nn.Module, tokenizer: Any, layer: str = "last", final_norm: bool = True):
        super().__init__()
        if layer not in LAYERS:
            raise ConfigError(f"text encoder layer must be one of {LAYERS}, got {layer!r}")
        if not hasattr(clip, "token_embedding"):
            raise ConfigError("the text encoder needs an open_clip CLIP with the built-in text tower")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.resblocks = clip.transformer.resblocks
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.tokenizer = tokenizer
        self.layer, self.final_norm = layer, final_norm
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: always in eval mode

    @property
    def width(self) -> int:
        """The hidden size: the UNet's ``context_dim``."""
        return self.token_embedding.embedding_dim

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(tokens) + self.positional_embedding  # (B, L, width)
        mask = self.attn_mask.to(hidden.dtype) if self.attn_mask is not None else None
        blocks = self.resblocks if self.layer == "last" else self.resblocks[:-1]
        for block in blocks:
            hidden = block(hidden, attn_mask=mask)
        return self.ln_final(hidden) if self.final_norm else hidden

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        return self(self.tokenizer(captions).to(self.token_embedding.weight.device))

    def fingerprint(self) -> str:
        """A short hash of the weights and settings, to tag caches made with this encoder."""
        digest = hashlib.sha256(f"{self.layer}:{self.final_norm}".encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    def from_source(
        cls,
        source: str | None = None,
        name: str | None = None,
        config: dict | None = None,
        layer: str = "last",
        final_norm: bool = True,
    ) -> TextEncoder:
        """Build from our CLIP stage's output or an open_clip file.

        ``source`` may be an export folder (``<run>/export/clip``, holding ``open_clip_config.json``),
        one of our CLIP checkpoints (``.ckpt``; its model spec comes with it), or an open_clip
        weights file (``.safetensors``/``.pt``/``.bin``) for the model ``name`` (or ``config``).
        With no ``source``, ``name``/``config`` give a randomly initialised tower (for tests).
        """
        clip, tokenizer = load_clip(source, name, config)
        return cls(clip, tokenizer, layer, final_norm)
