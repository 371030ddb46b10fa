"""LPIPS perceptual distance (VGG16 variant), from torchmetrics, with the VGG16 weights read from a
local file: nothing is downloaded.

torchmetrics ships LPIPS's linear calibration layers inside its package; the VGG16 backbone's
ImageNet weights are torchvision's file (``vgg16-397923af.pth``), which the user provides. Without
that file there is no perceptual loss (a random backbone would only add noise), and the autoencoder
task says so and trains on L1/L2 + KL (+ GAN).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.errors import ConfigError, MissingFileError

# torchvision's vgg16.features indices held by each of LPIPS's five slices
_SLICES = (range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30))


class LPIPS(nn.Module):
    """``LPIPS(vgg_weights)(x, y)`` -> (B,) distances for images in [-1, 1]. Frozen: it is a loss."""

    def __init__(self, vgg_weights: str | Path):
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS

        path = Path(vgg_weights)
        if not path.is_file():
            raise MissingFileError(
                f"LPIPS VGG16 weights {path} do not exist; give torchvision's vgg16 ImageNet weights file "
                f"(vgg16-397923af.pth) or set the perceptual weight to 0"
            )
        # pretrained=True: torchmetrics' bundled linear layers; pnet_rand=True: do not download VGG
        self.net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True, eval_mode=True)
        from trainer.checkpoints import torch_load

        state = torch_load(path, what="LPIPS VGG16 weights")
        features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        mapped = {}
        for number, indices in enumerate(_SLICES, start=1):
            for index in indices:
                for name in ("weight", "bias"):
                    if f"{index}.{name}" in features:
                        mapped[f"slice{number}.{index}.{name}"] = features[f"{index}.{name}"]
        result = self.net.net.load_state_dict(mapped, strict=False)
        if result.missing_keys:
            raise ConfigError(f"{path} is not torchvision's VGG16 state dict: missing {result.missing_keys[:5]}")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always in eval mode (dropout off)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y, normalize=False).flatten()
