"""The PatchGAN discriminator of the autoencoder stage (pix2pix's NLayerDiscriminator, as used by
taming-transformers and latent-diffusion): strided 4x4 convolutions that score overlapping patches
as real or reconstructed."""

from __future__ import annotations

from torch import nn


class PatchDiscriminator(nn.Module):
    """``input_channels`` -> ``channels`` -> ... (doubling up to 8x, ``layers`` stride-2 stages) -> 1
    logit per patch. BatchNorm between convolutions, LeakyReLU(0.2), weights N(0, 0.02)."""

    def __init__(self, input_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        stack: list[nn.Module] = [nn.Conv2d(input_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            stack += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        stack.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*stack)
        self.apply(_init_weights)

    def forward(self, images):  # (B, C, H, W) -> (B, 1, H', W') patch logits
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
