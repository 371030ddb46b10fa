"""LoRA against full fine-tuning of the UNet: trainable parameters, training step time and peak memory.

    python tools/bench/lora.py --threads 1 --steps 5                    # SD 1.5 shape at width 64, CPU
    python tools/bench/lora.py --device cuda --model-channels 320 --batch 8 --latent-size 64 --dtype bf16   # full SD 1.5

**The model** is :class:`trainer.models.unet.UNetModel` built from ``SD15`` (levels (1, 2, 4, 4), two ResBlocks per
level, SpatialTransformers with 8 heads at downsampling factors 4, 2, 1, context 77 x 768) with ``model_channels``
set by ``--model-channels`` (64 by default: the SD 1.5 shape at reduced width; 320 is SD 1.5 itself). Its
zero-initialised tensors (last convs, ``proj_out``, norm biases) get small random values, so that gradients reach
every layer as they would in a trained model.

**Full fine-tuning** steps every parameter. **LoRA** injects peft adapters (:func:`trainer.lora.apply_lora`; rank,
alpha and targets from ``--rank``, ``--alpha``, ``--targets``, default ``attention``: ``to_q``, ``to_k``, ``to_v``,
``to_out.0`` of every attention layer) and steps only them; the base is frozen.

**The step** is ``zero_grad``, forward (latents, timesteps, context), MSE against a fixed target, backward, and
``torch.optim.AdamW`` over the trainable parameters; ``--dtype bf16`` / ``fp16`` run forward and loss under autocast
(float32 weights and optimiser state). Each mode runs in its own fresh subprocess, ``--warmup`` untimed steps then
``--steps`` timed ones; the table gives medians of wall-clock and process CPU time per step (on a shared CPU machine
compare CPU time: other processes stretch wall time at random).

**Memory**, per mode in its own process: on CUDA ``torch.cuda.max_memory_allocated`` over the steps, and its growth
over what was allocated before the first step (weights and inputs); on CPU the process's peak resident set
(``ru_maxrss``) and its growth over the resident set just before the first step. The growth ("step MiB") is what
training adds to the model: gradients, AdamW state and activations; it is where LoRA saves.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's trainer, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # workers.py beside this file

from workers import mebibytes, report, run_worker  # noqa: E402

from trainer.models.unet import SD15, UNetModel  # noqa: E402

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("full", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-channels", type=int, default=64, help="UNet base width (SD 1.5: 320)")
    parser.add_argument("--context-dim", type=int, default=768)
    parser.add_argument("--context-tokens", type=int, default=77)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--targets", nargs="+", default=["attention"], help="LoRA targets (trainer.lora short names)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (both modes)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (float32: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # internal: measure one mode here
    return parser.parse_args(argv)


def unet_config(args: argparse.Namespace) -> dict[str, Any]:
    config = copy.deepcopy(SD15)
    config.update(
        model_channels=args.model_channels,
        context_dim=args.context_dim,
        image_size=args.latent_size,
        use_checkpoint=args.checkpointing,
    )
    return config


def build(args: argparse.Namespace, mode: str) -> UNetModel:
    torch.manual_seed(args.seed)
    model = UNetModel.from_config(unet_config(args))
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.02)
    if mode == "lora":
        from trainer.lora import LoraSpec, apply_lora

        apply_lora(model, LoraSpec(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets)), "unet")
    return model


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker_here(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(args, args.worker).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 1)
    side = args.latent_size
    latents = torch.randn(args.batch, 4, side, side, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    context = torch.randn(args.batch, args.context_tokens, args.context_dim, generator=generator).to(device)
    target = torch.randn(args.batch, 4, side, side, generator=generator).to(device)
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            prediction = model(latents, timesteps, context)
        F.mse_loss(prediction.float(), target).backward()
        optimizer.step()

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss_bytes()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in model.parameters()),
        "times": times,
        "before": before,
        "peak": peak,
        "load": os.getloadavg()[0],
    }


def run_subprocess(mode: str, argv: list[str]) -> dict[str, Any]:
    return run_worker(os.path.abspath(__file__), [*argv, "--worker", mode], mode)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        report(run_worker_here(args))
        return 0
    memory_kind = "CUDA allocated" if torch.device(args.device).type == "cuda" else "RSS"
    print(
        f"torch {torch.__version__}, {args.threads} threads, device {args.device}, dtype {args.dtype}, SD 1.5 shape at "
        f"width {args.model_channels}, context {args.context_tokens}x{args.context_dim}, latents "
        f"{args.batch}x4x{args.latent_size}x{args.latent_size}, checkpointing {'on' if args.checkpointing else 'off'}; "
        f"LoRA rank {args.rank}, alpha {args.alpha:g}, targets {' '.join(args.targets)}; load {os.getloadavg()[0]:.2f}"
    )
    results = {mode: run_subprocess(mode, argv) for mode in MODES}
    print(
        f"\n{'mode':<5} {'trainable':>12} {'of total':>12} {'share':>7} {'wall s':>7} {'CPU s':>7} {'samples/s':>9} "
        f"{'peak MiB':>9} {'step MiB':>9}"
    )
    summary = {}
    for mode, result in results.items():
        wall = statistics.median(t[0] for t in result["times"])
        cpu = statistics.median(t[1] for t in result["times"])
        step_memory = result["peak"] - result["before"]
        summary[mode] = {"wall": wall, "cpu": cpu, "step_memory": step_memory, "trainable": result["trainable"]}
        print(
            f"{mode:<5} {result['trainable']:>12,} {result['total']:>12,} {result['trainable'] / result['total']:>7.2%} "
            f"{wall:7.3f} {cpu:7.3f} {args.batch / wall:9.2f} {mebibytes(result['peak']):>9} {mebibytes(step_memory):>9}"
        )
    full, lora = summary["full"], summary["lora"]
    print(
        f"(medians of {args.steps} steps after {args.warmup} warm-up; peak: the {memory_kind} high-water mark of the "
        "mode's own process; step: its growth over the state before the first step)"
    )
    memory_ratio = lora["step_memory"] / full["step_memory"] if full["step_memory"] > 0 else float("nan")
    print(
        f"LoRA / full: {lora['trainable'] / full['trainable']:.2%} of the trainable parameters, "
        f"{lora['cpu'] / full['cpu']:.3f}x the CPU time and {lora['wall'] / full['wall']:.3f}x the wall time per step, "
        f"{memory_ratio:.3f}x the step memory"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
