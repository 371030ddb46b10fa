"""Merge LoRA adapters into base weights: one safetensors file whose UNet has the adapters' deltas added in, each at
its weight (through peft's merge; see trainer/lora.py).

    python tools/merge_lora.py outputs/shapes_ldm/latest/export/ldm.safetensors \
        outputs/shapes_ldm_lora/latest/export/lora.safetensors:0.8 --out merged/ldm.safetensors
    python tools/merge_lora.py RUN/checkpoints/last.ckpt style.safetensors:1 subject.safetensors:0.5 --out merged.safetensors
    python tools/merge_lora.py BASE adapter.safetensors --out merged.safetensors \
        --text-encoder outputs/shapes_clip/latest/export/clip --text-encoder-out merged_clip/

BASE is an LDM export (``export/ldm.safetensors``: ``model.diffusion_model.*`` + ``first_stage_model.*``; released
SD weights in that layout work too, as does a bare UNet state dict) or one of our latent diffusion checkpoints
(``.ckpt``: the EMA UNet when it has one, and its autoencoder; a LoRA run's checkpoint gives its base weights, its
own adapters being in its ``export/lora.safetensors``). The output has BASE's layout (a ``.ckpt`` becomes an
export) and everything BASE holds besides the merged tensors, unchanged; it is written atomically, and a merged export
loads as ``task.pretrained`` for further training.

Adapters are ``FILE[:WEIGHT]`` (weight 1 by default). Text-encoder adapters are merged into the CLIP the LDM conditions
on: give it with ``--text-encoder`` (an export folder such as ``export/clip``, an open_clip weights file or a CLIP
checkpoint) and where to write the merged one with ``--text-encoder-out`` (a folder for a folder, else a safetensors
file); or ``--skip-text-encoder`` to merge only the UNet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from trainer.errors import ConfigError, UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="base weights: an LDM export (.safetensors) or an LDM checkpoint (.ckpt)")
    parser.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA adapter files and their weights")
    parser.add_argument("--out", required=True, help="the merged weights (.safetensors)")
    parser.add_argument("--text-encoder", help="the CLIP the text-encoder adapters belong to (export folder or file)")
    parser.add_argument("--text-encoder-out", help="where to write the merged CLIP (a folder for a folder source)")
    parser.add_argument("--skip-text-encoder", action="store_true", help="ignore text-encoder adapters")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _strip_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA run's module state without its adapters, base weights under their plain names."""
    return {
        key.replace(".base_layer", ""): value
        for key, value in state.items()
        if not any(part.startswith("lora_") for part in key.split("."))
    }


def read_base(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """BASE as tensors in the export layout, and its metadata."""
    from trainer.checkpoints import load_lightning_checkpoint, read_weights

    if path.suffix != ".ckpt":
        return read_weights(path)
    checkpoint = load_lightning_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {})
    if "unet" not in hparams:
        raise ConfigError(f"{path} is not a latent diffusion checkpoint (no 'unet' in its hyperparameters)")
    state = checkpoint["state_dict"]
    prefix = "ema_unet.module." if any(k.startswith("ema_unet.module.") for k in state) else "unet."
    unet = _strip_adapters({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    tensors = {UNET_PREFIX + k: v for k, v in unet.items()}
    tensors.update({VAE_PREFIX + k[len("autoencoder.") :]: v for k, v in state.items() if k.startswith("autoencoder.")})
    metadata = {"format": "pt", "objective": str(hparams.get("objective", "eps"))}
    autoencoder = hparams.get("autoencoder") or {}
    scale = autoencoder.get("scale_factor")
    if scale is None and autoencoder.get("checkpoint") and Path(autoencoder["checkpoint"]).is_file():
        vae_state, vae_metadata = read_weights(autoencoder["checkpoint"])
        scale = vae_metadata.get("scale_factor") or (
            float(vae_state["scale_factor"]) if "scale_factor" in vae_state else None
        )
    if scale is not None:
        metadata["scale_factor"] = repr(float(scale))
    return tensors, metadata


def merge_unet(tensors, adapters, source: str) -> dict[str, torch.Tensor]:
    from trainer.lora import merge_into_state_dict

    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in tensors) else ""
    unet = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    merged = merge_into_state_dict(unet, adapters, "unet", f"the UNet weights in {source}")
    return {**tensors, **{prefix + k: v for k, v in merged.items()}}


def merge_text_encoder(source: Path, out: Path, adapters) -> Path:
    """Merge the text-encoder adapters into a CLIP's text tower (``transformer.resblocks.*``); write the whole CLIP."""
    from trainer.checkpoints import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, save_safetensors
    from trainer.lora import merge_into_state_dict
    from trainer.models.clip import read_state_dict

    weights = source / OPEN_CLIP_WEIGHTS if source.is_dir() else source
    state = read_state_dict(weights)
    tower = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    merged = merge_into_state_dict(tower, adapters, "text_encoder", f"the text tower of {source}")
    state = {**state, **{"transformer." + k: v for k, v in merged.items()}}
    if source.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / OPEN_CLIP_CONFIG, out / OPEN_CLIP_CONFIG)
        return save_safetensors(state, out / OPEN_CLIP_WEIGHTS, {"format": "pt"}).parent
    return save_safetensors(state, out, {"format": "pt"})


def run(args: argparse.Namespace) -> int:
    from trainer.checkpoints import save_safetensors
    from trainer.lora import parse_adapter_arg, read_adapters

    base, out = Path(args.base), Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the merged weights are written as .safetensors; name the file so")
    adapters = [(read_adapters(path), weight) for path, weight in map(parse_adapter_arg, args.adapters)]
    with_text = [adapter.path for adapter, _ in adapters if "text_encoder" in adapter.specs]
    if with_text and not args.skip_text_encoder and not (args.text_encoder and args.text_encoder_out):
        raise ConfigError(
            f"{', '.join(map(str, with_text))} also adapt the text encoder: give --text-encoder (the CLIP the LDM "
            "conditions on) and --text-encoder-out, or --skip-text-encoder to merge the UNet adapters only"
        )
    if with_text and not args.skip_text_encoder and not Path(args.text_encoder).exists():
        raise ConfigError(f"--text-encoder {args.text_encoder} does not exist")
    tensors, metadata = read_base(base)
    if any("unet" in adapter.specs for adapter, _ in adapters):
        tensors = merge_unet(tensors, adapters, str(base))
    merged_list = [[str(adapter.path), weight] for adapter, weight in adapters]
    metadata = {**metadata, "format": "pt", "merged_lora": json.dumps(merged_list)}
    save_safetensors(tensors, out, metadata)
    print(f"wrote {out}: {base} with {len(adapters)} adapter(s) merged")
    if with_text and not args.skip_text_encoder:
        source = Path(args.text_encoder)
        written = merge_text_encoder(source, Path(args.text_encoder_out), adapters)
        print(f"wrote {written}: {source} with the text-encoder adapters merged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
