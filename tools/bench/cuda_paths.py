"""The CUDA paths of the three models' training steps: precision, channels_last, torch.compile, attention kernels.

    python tools/bench/cuda_paths.py                      # on a GPU: SD 1.5 UNet, kl-f8 VAE, ViT-B/32 CLIP
    python tools/bench/cuda_paths.py --tiny --device cpu  # the same code path on tiny models (a smoke run)

For each model, one training step (zero_grad, forward, loss, backward, AdamW) runs in each **mode**:

- ``fp32``: float32 weights and math (TF32 matmuls off, so it is the reference);
- ``bf16``: autocast to bfloat16, float32 weights and optimizer state (Lightning's ``bf16-mixed``);
- ``fp16``: autocast to float16 with a ``torch.amp.GradScaler`` (Lightning's ``16-mixed``);
- ``bf16+cl``: bf16 with the model and its inputs in channels_last (NHWC), as ``task.channels_last: true`` (UNet and
  VAE);
- ``bf16+compile``: bf16 with the model compiled in place, as ``task.compile: true`` (``--compile-mode`` picks
  torch.compile's mode); its first step, compilation included, is reported as ``first s``;
- ``bf16+cl+compile``: both (UNet and VAE).

Every mode starts from the same weights and inputs. The table gives the median step time over ``--iters`` steps
after ``--warmup``, samples/s, the peak of ``torch.cuda.max_memory_allocated``, MFU (model FLOPs of forward and
backward, counted once with ``FlopCounterMode`` under the math attention backend, over the step time and
``--peak-tflops``, 989 by default: H100 SXM dense bf16, so fp32 rows read low by design), and the first step's loss
relative to fp32's (|loss - loss_fp32| / |loss_fp32|: bf16 and fp16 rounding, about 1e-3 to 1e-2; a NaN or a
large value is a broken path). ``nonfinite`` counts steps whose loss was not finite (fp16's scaler skips those).

**Attention kernels.** For the UNet and the VAE (our ``F.scaled_dot_product_attention`` calls) and CLIP (open_clip's
attention), a bf16 forward and backward runs under the profiler and the script lists the attention kernels CUDA
launched (flash, memory-efficient, cuDNN or math), then runs once more with SDPA restricted to the flash backend:
``flash ok`` means our shapes are flash-eligible (head size, dtype, layout), ``flash refused`` gives torch's reason.

The losses are stand-ins with the real ones' cost (noise-prediction MSE, L1 + KL, open_clip's ClipLoss); the data are
random tensors, so the numbers are the model's, not the loader's. ``tools/bench/clip_step.py --device cuda`` times
the whole CLIP training loop with its data.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's trainer, installed or not

from trainer.models.autoencoder import AutoencoderKL  # noqa: E402
from trainer.models.clip import build_clip  # noqa: E402
from trainer.models.unet import UNetModel  # noqa: E402

MODES = ("fp32", "bf16", "fp16", "bf16+cl", "bf16+compile", "bf16+cl+compile")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "efficient", "cudnn", "attention", "softmax")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["unet", "vae", "clip"], choices=["unet", "vae", "clip"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches: a smoke run of every path")
    parser.add_argument("--unet-batch", type=int, default=8, help="SD 1.5 at 64x64 latents (512 px images)")
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--clip-batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (compilation happens here)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile's mode in the +compile rows")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM dense bf16: 989)")
    parser.add_argument("--profile", action="store_true", help="print each mode's top GPU kernels (3 profiled steps)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# -- the models and their steps ---------------------------------------------------------------------------------


def model_config(kind: str, name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / "model" / kind / f"{name}.yaml").read_text())


class Case:
    """A model, a batch of inputs and a loss: ``loss(model)`` runs forward and returns the scalar to backpropagate."""

    def __init__(
        self, name: str, model: nn.Module, inputs: dict[str, torch.Tensor], loss: Callable, samples: int, convs: bool
    ):
        self.name, self.model, self.inputs, self.loss_fn, self.samples = name, model, inputs, loss, samples
        self.convs = convs  # a convolutional network: the channels_last rows apply
        with torch.no_grad():  # zero-initialised layers (the UNet's output convs) would make every mode's loss equal
            for parameter in model.parameters():
                if not parameter.any():
                    parameter.normal_(0, 0.02)

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(model, inputs)


def unet_case(args: argparse.Namespace, device: torch.device) -> Case:
    config = model_config("unet", "sd15")
    config["use_checkpoint"] = False  # activations fit: time the plain step
    batch, side = (2, 16) if args.tiny else (args.unet_batch, 64)
    if args.tiny:
        config.update(model_channels=32, context_dim=64, num_heads=2)
    model = UNetModel.from_config(config)
    context_dim = config["context_dim"]
    inputs = {
        "x": torch.randn(batch, 4, side, side),
        "t": torch.randint(0, 1000, (batch,)),
        "context": torch.randn(batch, 77, context_dim),
        "target": torch.randn(batch, 4, side, side),
    }

    def loss(model, i):
        return F.mse_loss(model(i["x"], i["t"], i["context"]).float(), i["target"])

    return Case("unet", model, {k: v.to(device) for k, v in inputs.items()}, loss, batch, True)


def vae_case(args: argparse.Namespace, device: torch.device) -> Case:
    config = model_config("autoencoder", "kl_f8")
    batch, side = (2, 32) if args.tiny else (args.vae_batch, args.vae_size)
    if args.tiny:
        config["ddconfig"].update(ch=32, ch_mult=[1, 2], resolution=side)
    model = AutoencoderKL.from_config(config)
    inputs = {"x": torch.rand(batch, 3, side, side) * 2 - 1}

    def loss(model, i):
        reconstruction, posterior = model(i["x"])
        return F.l1_loss(reconstruction.float(), i["x"]) + 1e-6 * posterior.kl().float().mean()

    return Case("vae", model, {k: v.to(device) for k, v in inputs.items()}, loss, batch, True)


def clip_case(args: argparse.Namespace, device: torch.device) -> Case:
    from open_clip.loss import ClipLoss

    if args.tiny:
        config = {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
        }
        model, _ = build_clip("cuda-paths-tiny", config)
        batch, side, length = 4, 32, 16
    else:
        spec = model_config("clip", "vit_b32")
        model, _ = build_clip(spec["name"], spec.get("config"))
        batch, side, length = args.clip_batch, 224, 77
    inputs = {"images": torch.randn(batch, 3, side, side), "tokens": torch.randint(1, 49000, (batch, length))}
    inputs["tokens"][:, -1] = 49407  # the end-of-text token, where the text tower pools
    criterion = ClipLoss()

    def loss(model, i):
        out = model(i["images"], i["tokens"])
        return criterion(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())

    return Case("clip", model, {k: v.to(device) for k, v in inputs.items()}, loss, batch, False)


CASES = {"unet": unet_case, "vae": vae_case, "clip": clip_case}


# -- measuring -------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, mode: str):
    dtype = AUTOCAST[mode.split("+")[0]]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def count_flops(case: Case) -> int:
    """Model FLOPs of one forward and backward of the batch (math attention: its matmuls, no recomputation),
    counted on one sample and multiplied by the batch: math attention on the whole batch can exhaust the GPU (SD
    1.5 at batch 32 did, on 80 GB)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(case.model)
    one = {name: tensor[:1] for name, tensor in case.inputs.items()}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        case.loss(model, one).backward()
    del model
    return counter.get_total_flops() * case.samples


def run_mode(case: Case, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = copy.deepcopy(case.model)
    inputs = dict(case.inputs)
    if "+cl" in mode:
        model = model.to(memory_format=torch.channels_last)
        inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in inputs.items()}
    if "compile" in mode:
        model.compile(mode=args.compile_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=mode.startswith("fp16"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, mode):
            loss = case.loss(model, inputs)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    times, losses, nonfinite = [], [], 0
    for _ in range(args.warmup + args.iters):
        synchronize(device)
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        value = loss.item()
        losses.append(value)
        nonfinite += not math.isfinite(value)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            synchronize(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(
            f"## {case.name} {mode}: 3 steps\n"
            + prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
        )
    return {
        "step_s": statistics.median(times[args.warmup :]),
        "first_s": times[0],
        "first_loss": losses[0],
        "nonfinite": nonfinite,
        "peak_gib": peak,
    }


def attention_kernels(case: Case, device: torch.device) -> str:
    """The attention kernels a bf16 forward + backward launches, and whether SDPA's flash backend takes our shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return "(CUDA only)"
    model = copy.deepcopy(case.model)
    with profile(activities=[ProfilerActivity.CUDA]) as prof, autocast(device, "bf16"):
        case.loss(model, case.inputs).backward()
    names = sorted({e.key[:70] for e in prof.key_averages() if any(w in e.key.lower() for w in ATTENTION_KERNEL_WORDS)})
    model.zero_grad(set_to_none=True)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(device, "bf16"):
            case.loss(model, case.inputs).backward()
        flash = "flash ok"
    except RuntimeError as error:
        flash = "flash refused: " + str(error).splitlines()[0][:200]
    return f"{flash}; kernels: " + ("; ".join(names) if names else "none matched")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is the reference; autocast rows use bf16/fp16 anyway
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows, notes = [], []
    for name in args.models:
        torch.manual_seed(args.seed)
        case = CASES[name](args, device)
        case.model.to(device)
        flops = count_flops(case)
        notes.append(
            f"{name}: {sum(p.numel() for p in case.model.parameters()) / 1e6:.1f} M parameters, "
            f"{flops / case.samples / 1e9:.1f} GFLOP forward+backward per sample, batch {case.samples}"
        )
        notes.append(f"{name} attention: {attention_kernels(case, device)}")
        reference = None
        for mode in args.modes:
            if "+cl" in mode and not case.convs:
                continue
            try:
                result = run_mode(case, mode, args, device)
            except Exception as error:  # one broken path must not hide the others' numbers
                traceback.print_exc()
                rows.append((name, mode, f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:120]}"))
                continue
            if mode == "fp32":
                reference = result["first_loss"]
            error = abs(result["first_loss"] - reference) / abs(reference) if reference else float("nan")
            mfu = flops / result["step_s"] / (args.peak_tflops * 1e12)
            rows.append(
                (
                    name,
                    mode,
                    f"{result['step_s'] * 1e3:9.1f} | {case.samples / result['step_s']:8.1f} | "
                    f"{result['peak_gib']:6.2f} | {100 * mfu:5.1f} % | {error:.1e} | {result['nonfinite']} | "
                    f"{result['first_s']:6.1f}",
                )
            )
            print(f"{name} {mode}: {rows[-1][2]}", flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    for note in notes:
        print("# " + note)
    print("| model | mode | step ms | samples/s | peak GiB | MFU | loss vs fp32 | nonfinite | first s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, mode, text in rows:
        print(f"| {name} | {mode} | {text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
