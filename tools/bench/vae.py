"""KL autoencoder inference throughput: our ``AutoencoderKL`` against diffusers' on the same config and weights.

    /tmp/diffvenv/bin/python tools/bench/vae.py --threads 1                  # SD kl-f8, 256 px, batch 4, CPU
    /tmp/diffvenv/bin/python tools/bench/vae.py --threads 1 --channels-last  # both models and inputs in NHWC
    /tmp/diffvenv/bin/python tools/bench/vae.py --device cuda --dtype bf16 --size 512 --batch 8 --iters 20

diffusers is a benchmark-only dependency, never one of the project's: install it into a separate environment that
sees this one's torch (``python -m venv --system-site-packages /tmp/diffvenv && /tmp/diffvenv/bin/pip install
diffusers``, checking that pip leaves torch alone). Without diffusers only our figures are printed.

**Ours** is :class:`trainer.models.autoencoder.AutoencoderKL` built from ``SD_KL_F8``. **diffusers** is
``diffusers.AutoencoderKL`` built with the same configuration (block_out_channels = ch * ch_mult, layers_per_block =
num_res_blocks, latent_channels = z_channels, four DownEncoderBlock2D / UpDecoderBlock2D, 32 groups). Nothing is
downloaded: ours is randomly initialised, and its weights are copied into diffusers' model through the key mapping of
:func:`to_diffusers_key`, which proves the two have the same parameters (names, shapes, count) and lets the script
check that they compute the same thing (encoder mean and decoder output, relative max error) before timing.

Timing: ``encode`` is images (B, 3, S, S) -> posterior (its mean and std are computed by both); ``decode`` is latents
(B, 4, S/8, S/8) -> images. Everything runs under ``torch.inference_mode`` with the same thread count; after
``--warmup`` calls of each, ``--iters`` rounds alternate the two models (ours first in even rounds, diffusers first in
odd ones). Each call's wall-clock time and the process's CPU time are recorded; images/s come from the median wall
time. The PASS/FAIL lines compare ours / diffusers with the target ratio, in CPU time on CPU (other processes on a
shared machine stretch wall time at random; run with ``--threads 1`` there, so that CPU time is the work of one core
and not threads spinning while their partner waits for a core) and in wall time on CUDA. The exit status is 1 only
when the models differ (parameter count or outputs), never for timing.

Layout matters on CPU: diffusers' mid-block attention returns its output as a channels_last (NHWC) view and adds the
residual to it, so its whole upsampling path runs in NHWC, which oneDNN convolutions and nearest upsampling do faster on
CPU; our ``Decoder`` converts the mid block's output to NHWC on purpose. ``--channels-last`` puts both models' weights
and inputs in NHWC (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's trainer, installed or not

from trainer.models.autoencoder import SD_KL_F8, AutoencoderKL  # noqa: E402

TARGET = 1.0  # ours / diffusers images/s must reach this, for encode and decode separately
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative max error allowed between the two models' outputs (random weights; bf16 rounding compounds over depth).
OUTPUT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (each model encodes and decodes once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each model and direction first")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameters and inputs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--channels-last", action="store_true", help="both models and inputs in NHWC")
    parser.add_argument("--ours-only", action="store_true", help="skip diffusers even where it is installed")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# -- the two models ---------------------------------------------------------------------------------------------------


def diffusers_kwargs(config: dict[str, Any], size: int) -> dict[str, Any]:
    """Arguments of ``diffusers.AutoencoderKL`` for one of our configs (``{"embed_dim", "ddconfig"}``)."""
    dd = config["ddconfig"]
    if dd["attn_resolutions"]:
        raise ValueError("diffusers' AutoencoderKL has attention only in the mid block; use attn_resolutions=[]")
    if config["embed_dim"] != dd["z_channels"]:
        raise ValueError("diffusers' AutoencoderKL has one latent_channels for embed_dim and z_channels")
    levels = len(dd["ch_mult"])
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(dd["ch"] * mult for mult in dd["ch_mult"]),
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "sample_size": size,
    }


_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def to_diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of one of our (CompVis-layout) autoencoder parameters; ``levels`` = len(ch_mult)."""
    # Encoder levels keep their index; decoder ``up[i]`` runs (levels - 1 - i)-th, which is diffusers' order.
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", key)
    key = re.sub(
        r"^decoder\.up\.(\d+)\.(block|upsample|attn)\.",
        lambda m: (
            f"decoder.up_blocks.{levels - 1 - int(m[1])}."
            + {"block": "resnets.", "upsample": "upsamplers.0.", "attn": "attentions."}[m[2]]
        ),
        key,
    )
    key = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    if ".attentions." in key:  # single-head attention: 1x1 convs become Linears with new names
        head, name, tail = key.rsplit(".", 2)
        key = f"{head}.{_ATTENTION_NAMES[name]}.{tail}"
    return key


def copy_into_diffusers(ours: AutoencoderKL, theirs: nn.Module, levels: int) -> None:
    """Load our weights into diffusers' model (strict: every name must match and every shape agree)."""
    target = theirs.state_dict()
    mapped = {}
    for key, value in ours.state_dict().items():
        name = to_diffusers_key(key, levels)
        if name not in target:
            raise KeyError(f"{key} -> {name}: no such diffusers parameter")
        mapped[name] = value.reshape(target[name].shape)  # (C, C, 1, 1) convs -> (C, C) linears
    theirs.load_state_dict(mapped, strict=True)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# -- timing -----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def relative_error(ours: Tensor, reference: Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-12)).item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    config = copy.deepcopy(SD_KL_F8)
    levels = len(config["ddconfig"]["ch_mult"])
    factor = 2 ** (levels - 1)
    if args.size % factor:
        raise SystemExit(f"--size must be a multiple of {factor}")

    have_diffusers = not args.ours_only and importlib.util.find_spec("diffusers") is not None
    ours = AutoencoderKL.from_config(config).eval()
    models: dict[str, nn.Module] = {"ours": ours}
    ok = True
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, dtype {args.dtype}")
    print(f"ours:      {parameter_count(ours):,} parameters")
    if have_diffusers:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()  # not the float32-modules advice for from_pretrained
        theirs = diffusers.AutoencoderKL(**diffusers_kwargs(config, args.size)).eval()
        copy_into_diffusers(ours, theirs, levels)
        models["diffusers"] = theirs
        same = parameter_count(ours) == parameter_count(theirs)
        ok &= same
        print(f"diffusers: {parameter_count(theirs):,} parameters (diffusers {diffusers.__version__})")
        print(f"{'PASS' if same else 'FAIL'} parameter count: equal: {same}; all weights copied by name (strict)")
    else:
        print("diffusers is not installed (or --ours-only): our figures only")
    for model in models.values():
        model.to(device=device, dtype=dtype, memory_format=memory_format)

    images = torch.randn(args.batch, 3, args.size, args.size, dtype=dtype, device=device)
    latents = torch.randn(args.batch, 4, args.size // factor, args.size // factor, dtype=dtype, device=device)
    images, latents = images.contiguous(memory_format=memory_format), latents.contiguous(memory_format=memory_format)
    calls: dict[str, dict[str, Callable[[], Tensor]]] = {
        "ours": {"encode": lambda: ours.encode(images).mean, "decode": lambda: ours.decode(latents)}
    }
    if "diffusers" in models:
        calls["diffusers"] = {
            "encode": lambda: theirs.encode(images).latent_dist.mean,
            "decode": lambda: theirs.decode(latents).sample,
        }

    times: dict[str, dict[str, list[tuple[float, float]]]] = {name: {"encode": [], "decode": []} for name in calls}
    with torch.inference_mode():
        outputs = {name: {op: call() for op, call in ops.items()} for name, ops in calls.items()}  # warm-up 1
        if "diffusers" in outputs:
            for op in ("encode", "decode"):
                error = relative_error(outputs["ours"][op], outputs["diffusers"][op])
                same = error <= OUTPUT_TOLERANCE[dtype]
                ok &= same
                print(f"{'PASS' if same else 'FAIL'} {op} outputs match: relative max error {error:.2e}")
        del outputs
        for _ in range(args.warmup - 1):
            for ops in calls.values():
                for call in ops.values():
                    call()
        for round_index in range(args.iters):
            names = list(calls) if round_index % 2 == 0 else list(reversed(calls))
            for name in names:
                for op, call in calls[name].items():
                    times[name][op].append(timed(call, device))

    # On CPU the verdict compares CPU seconds: other processes on the machine stretch wall-clock calls at random,
    # not the CPU work of a call (see docs/benchmarks.md). On CUDA it compares wall-clock time.
    use_cpu_time = device.type == "cpu"
    print(f"\nSD kl-f8, {args.size} px, batch {args.batch}, {args.iters} rounds, load {os.getloadavg()[0]:.2f}")
    print(f"{'model':<10} {'op':<7} {'wall s':>8} {'min':>7} {'max':>7} {'CPU s':>7} {'images/s':>9}")
    medians: dict[str, dict[str, tuple[float, float]]] = {}
    for name, ops in times.items():
        for op, values in ops.items():
            wall = [value[0] for value in values]
            median, cpu_median = statistics.median(wall), statistics.median(value[1] for value in values)
            medians.setdefault(name, {})[op] = (median, cpu_median)
            print(
                f"{name:<10} {op:<7} {median:8.3f} {min(wall):7.3f} {max(wall):7.3f} {cpu_median:7.3f} "
                f"{args.batch / median:9.2f}"
            )
    print("(medians per call; images/s from the wall-clock median)")
    if "diffusers" in medians:
        for op in ("encode", "decode"):
            wall_ratio = medians["diffusers"][op][0] / medians["ours"][op][0]
            cpu_ratio = medians["diffusers"][op][1] / medians["ours"][op][1]
            ratio = cpu_ratio if use_cpu_time else wall_ratio
            verdict = "PASS" if ratio >= TARGET else "FAIL"
            measure = "CPU time" if use_cpu_time else "wall time"
            print(
                f"{verdict} {op} ({measure}): ours {ratio:.3f}x diffusers' images/s (target >= {TARGET:.2f}x); "
                f"wall-clock ratio {wall_ratio:.3f}x"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
