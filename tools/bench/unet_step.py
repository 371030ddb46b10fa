"""UNet training step time and peak memory: our ``UNetModel`` against diffusers' ``UNet2DConditionModel``.

    /tmp/diffvenv/bin/python tools/bench/unet_step.py --threads 1 --iters 12     # SD 1.5 shape at width 64, CPU
    /tmp/diffvenv/bin/python tools/bench/unet_step.py --device cuda --dtype bf16 --full   # full SD 1.5, GPU, MFU

diffusers is a benchmark-only dependency, never one of the project's: install it into a separate environment that
sees this one's torch (``python -m venv --system-site-packages /tmp/diffvenv && /tmp/diffvenv/bin/pip install
diffusers``, checking that pip leaves torch alone). Without diffusers only our figures are printed.

**The models.** Ours is :class:`trainer.models.unet.UNetModel` built from ``SD15`` with ``model_channels`` set by
``--model-channels`` (64 by default, 320 with ``--full``) and ``context_dim`` by ``--context-dim``: levels
(1, 2, 4, 4), two ResBlocks per level, a SpatialTransformer (conv projections, depth 1, 8 heads) at downsampling
factors 4, 2 and 1. diffusers' ``UNet2DConditionModel`` gets the same configuration: block_out_channels =
model_channels * channel_mult, CrossAttnDownBlock2D x3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D x3,
layers_per_block 2, cross_attention_dim = context_dim and ``attention_head_dim=8``, which in diffusers' SD 1.x
configs means 8 *heads* (the name is historical). Nothing is downloaded: ours is randomly initialised (its
zero-initialised convs, norms' biases and ``proj_out``s given small random values, so gradients are not trivially
zero), saved to a temporary safetensors file, and loaded into both, diffusers' through the key mapping of
:func:`to_diffusers_key` (strict: the two have the same parameters, names and shapes). A check run feeds both the
same input and compares outputs before anything is timed.

**The step** is ``zero_grad``, forward (latents, timesteps, context), MSE against a fixed target, backward, and
``torch.optim.AdamW`` (torch's default implementation: foreach on CUDA, a loop over parameters on CPU). ``--dtype
bf16`` / ``fp16`` run forward and loss under autocast with float32 parameters and optimiser state (mixed precision, as
training does; no gradient scaler, which does not change the time); ``float32`` runs without autocast.
``--checkpointing`` turns on gradient checkpointing in both (ours: every ResBlock and SpatialTransformer; diffusers:
``enable_gradient_checkpointing``).

**Time.** On CPU (``--interleave``, the default there) both models live in one subprocess and their steps alternate
(ours, diffusers, diffusers, ours, ...) after ``--warmup`` untimed steps each, so that whatever else runs on the
machine falls on both alike. Each step's wall-clock time and the process's CPU time are recorded, and the verdict
compares median CPU time: on a shared machine other processes stretch wall time at random (two identical models
measured 14 % apart in wall time, 0.2 % apart in CPU time). Use ``--threads 1`` there: with more threads than free
cores, threads spin at barriers while a partner waits for a core, which inflates both measures (5x, seen at a load
of 6 on 2 cores). On CUDA (``--no-interleave``, the default there) each model runs alone in its own subprocess,
``--rounds`` times in alternating order, and the verdict compares median wall time (synchronised).

**Memory** is measured in a fresh subprocess per model, so that the peak is that model's: on CUDA
``torch.cuda.max_memory_allocated`` over the steps and its growth over what was allocated before the first step
(weights, inputs); on CPU the process's peak resident set (``ru_maxrss``) and its growth over the resident set just
before the first step. The growth ("step memory") is what the step itself needs (gradients, AdamW state, activations)
and leaves out the imports (diffusers' are larger than ours); the verdict compares it.

**FLOPs** (``--flops``, on by default on CUDA): one forward + backward of one sample is counted with
``torch.utils.flop_counter.FlopCounterMode`` under the math attention backend (so attention counts as its matmuls
on every device, with no recomputation: model FLOPs), times the batch; MFU = FLOPs per step / median wall time /
``--peak-tflops`` (989 by default on CUDA: H100 SXM dense bf16). Full SD 1.5 at 64x64 latents: 0.803 TFLOP forward,
2.407 TFLOP forward + backward per sample.

The PASS/FAIL lines compare ours with diffusers (speed ratio >= 1.0; step memory no larger, with a 2 % allowance for
RSS page granularity on CPU); the exit status is 1 only when the models differ (parameters or outputs), never for time
or memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's trainer, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # workers.py beside this file

from workers import mebibytes, report, run_worker  # noqa: E402

from trainer.models.unet import SD15, UNetModel  # noqa: E402

TIME_TARGET = 1.0  # ours / diffusers steps per second must reach this
MEMORY_ALLOWANCE = {"cpu": 1.02, "cuda": 1.0}  # ours' peak step memory may be at most this times diffusers'
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative max error allowed between the two models' outputs (random weights; bf16 rounding compounds over depth).
OUTPUT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}
H100_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full SD 1.5: width 320, 64x64 latents, batch 8")
    parser.add_argument("--model-channels", type=int, help="UNet base width (default 64; 320 with --full)")
    parser.add_argument("--context-dim", type=int, default=768, help="text embedding width (cross-attention)")
    parser.add_argument("--context-tokens", type=int, default=77)
    parser.add_argument("--latent-size", type=int, help="latent side (default 32; 64 with --full)")
    parser.add_argument("--batch", type=int, help="samples per step (default 2; 8 with --full)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        help="time both models in one process, steps alternating (default: on CPU; else one process per model)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="without --interleave: timed runs per model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (float32: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both models")
    parser.add_argument("--channels-last", action="store_true", help="both models and inputs in NHWC")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, help="count FLOPs (default: on CUDA)")
    parser.add_argument(
        "--peak-tflops", type=float, help=f"device peak for MFU (CUDA default {H100_BF16_DENSE_TFLOPS})"
    )
    parser.add_argument("--ours-only", action="store_true", help="skip diffusers even where it is installed")
    parser.add_argument("--seed", type=int, default=0)
    # Internal: run one model's measurement (or the output check) in this process and print a RESULT line.
    parser.add_argument("--worker", choices=["ours", "diffusers", "check", "interleaved"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    full = args.full
    args.model_channels = args.model_channels or (320 if full else 64)
    args.latent_size = args.latent_size or (64 if full else 32)
    args.batch = args.batch or (8 if full else 2)
    if args.flops is None:
        args.flops = torch.device(args.device).type == "cuda"
    if args.interleave is None:
        args.interleave = torch.device(args.device).type == "cpu"
    if args.peak_tflops is None and torch.device(args.device).type == "cuda":
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    return args


# -- the two models ---------------------------------------------------------------------------------------------------


def unet_config(args: argparse.Namespace) -> dict[str, Any]:
    """SD 1.5's ``unet_config.params`` at the requested width and context size."""
    config = copy.deepcopy(SD15)
    config.update(
        model_channels=args.model_channels,
        context_dim=args.context_dim,
        image_size=args.latent_size,
        use_checkpoint=args.checkpointing,
    )
    return config


def diffusers_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Arguments of ``diffusers.UNet2DConditionModel`` for an SD 1.x-layout config of ours."""
    levels = len(config["channel_mult"])
    factors = [2**level for level in range(levels)]
    attention = [factor in config["attention_resolutions"] for factor in factors]
    if not all(attention[:-1]) or attention[-1]:
        raise ValueError("the diffusers mapping here expects cross-attention at every level but the last")
    return {
        "sample_size": config["image_size"],
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        "block_out_channels": tuple(config["model_channels"] * mult for mult in config["channel_mult"]),
        "layers_per_block": config["num_res_blocks"],
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": config["context_dim"],
        "attention_head_dim": config["num_heads"],  # diffusers' SD 1.x naming: this is the number of heads
        "use_linear_projection": config.get("use_linear_in_transformer", False),
        "transformer_layers_per_block": config["transformer_depth"],
    }


_RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _resblock(rest: str) -> str:
    for ours, theirs in _RESBLOCK_NAMES.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    raise KeyError(rest)


def to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """The diffusers name of one of our (CompVis-layout) UNet parameters; SpatialTransformer names are the same."""
    per_level = num_res_blocks + 1  # input blocks per level (ResBlocks + Downsample); output blocks per level
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}  # fmt: skip
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    if match := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        level, index = divmod(int(match[1]) - 1, per_level)
        layer, rest = int(match[2]), match[3]
        if index == num_res_blocks:  # the Downsample entry: ``op`` is the stride-2 conv
            return f"down_blocks.{level}.downsamplers.0.conv." + rest.removeprefix("op.")
        if layer == 0:
            return f"down_blocks.{level}.resnets.{index}.{_resblock(rest)}"
        return f"down_blocks.{level}.attentions.{index}.{rest}"
    if match := re.match(r"middle_block\.(\d+)\.(.*)", key):
        layer, rest = int(match[1]), match[2]
        if layer == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{layer // 2}.{_resblock(rest)}"
    if match := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        level, index = divmod(int(match[1]), per_level)
        layer, rest = int(match[2]), match[3]
        if layer == 0:
            return f"up_blocks.{level}.resnets.{index}.{_resblock(rest)}"
        if rest.startswith("conv."):  # Upsample (attention layers have no ``conv``)
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{index}.{rest}"
    raise KeyError(f"no diffusers name for {key}")


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def build_model(name: str, config: dict[str, Any], weights: str | None) -> nn.Module:
    """Our UNet or diffusers', with the weights in ``weights`` (our names) when given."""
    from safetensors.torch import load_file

    state = load_file(weights) if weights else None
    if name == "ours":
        model = UNetModel.from_config(config)
        if state is not None:
            model.load_state_dict(state, strict=True)
        return model
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    model = diffusers.UNet2DConditionModel(**diffusers_kwargs(config))
    if config["use_checkpoint"]:
        model.enable_gradient_checkpointing()
    if state is not None:
        mapped = {to_diffusers_key(key, config["num_res_blocks"]): value for key, value in state.items()}
        model.load_state_dict(mapped, strict=True)
    return model


def randomised_weights(config: dict[str, Any], seed: int) -> dict[str, Tensor]:
    """Our UNet's initial weights with every all-zero tensor (zero-initialised convs, norm biases) made small and
    random, so that outputs and gradients are not trivially zero."""
    torch.manual_seed(seed)
    model = UNetModel.from_config(config)
    state = {}
    for key, value in model.state_dict().items():
        if not value.any():
            value = 0.02 * torch.randn_like(value)
        state[key] = value.contiguous()
    return state


# -- one model's measurement (in a subprocess) ------------------------------------------------------------------------


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(args: argparse.Namespace, batch: int, device: torch.device) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    side = args.latent_size
    latents = torch.randn(batch, 4, side, side, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, args.context_tokens, args.context_dim, generator=generator)
    target = torch.randn(batch, 4, side, side, generator=generator)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    latents = latents.contiguous(memory_format=memory_format)
    return tuple(tensor.to(device) for tensor in (latents, timesteps, context, target))


def forward(name: str, model: nn.Module, latents: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
    if name == "ours":
        return model(latents, timesteps, context)
    return model(latents, timesteps, encoder_hidden_states=context, return_dict=False)[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One model, its AdamW and its inputs; :meth:`step` is one training step."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.name, self.device, self.dtype = name, device, dtype
        self.model = build_model(name, unet_config(args), args.weights)
        self.model.to(device=device, memory_format=memory_format).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.latents, self.timesteps, self.context, self.target = make_inputs(args, args.batch, device)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.dtype):
            prediction = forward(self.name, self.model, self.latents, self.timesteps, self.context)
        F.mse_loss(prediction.float(), self.target).backward()
        self.optimizer.step()

    def timed_step(self) -> tuple[float, float]:
        """(wall-clock seconds, CPU seconds of this process) of one step."""
        synchronize(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        self.step()
        synchronize(self.device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def run_worker_here(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if args.worker == "check":  # both models, one forward each on the same input, outputs compared
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        latents, timesteps, context, _ = make_inputs(args, min(args.batch, 2), device)
        outputs = {}
        for name in ("ours", "diffusers"):
            model = build_model(name, unet_config(args), args.weights).to(device=device, memory_format=memory_format)
            with torch.no_grad(), autocast_context(device, dtype):
                outputs[name] = forward(name, model, latents, timesteps, context).float()
            del model
        error = (outputs["ours"] - outputs["diffusers"]).abs().max() / outputs["diffusers"].abs().max()
        return {"relative_error": error.item(), "scale": outputs["diffusers"].abs().max().item()}

    if args.worker == "interleaved":  # both models in this process, steps alternating ours, diffusers, diffusers, ...
        steppers = [Stepper(name, args, device, dtype) for name in ("ours", "diffusers")]
        for _ in range(args.warmup):
            for stepper in steppers:
                stepper.step()
        times: dict[str, list[tuple[float, float]]] = {stepper.name: [] for stepper in steppers}
        for index in range(args.iters):
            for stepper in steppers if index % 2 == 0 else reversed(steppers):
                times[stepper.name].append(stepper.timed_step())
        result: dict[str, Any] = {"times": times, "load": os.getloadavg()[0]}
        if args.flops:
            result["flops"] = {stepper.name: count_flops(stepper, args) for stepper in steppers}
        return result

    # One model alone in this process: peak memory over its steps, and their times.
    stepper = Stepper(args.worker, args, device, dtype)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memory_before = torch.cuda.memory_allocated(device)
    else:
        memory_before = current_rss_bytes()
    for _ in range(args.warmup):
        stepper.step()
    step_times = [stepper.timed_step() for _ in range(args.iters)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {
        "times": step_times,
        "parameters": parameter_count(stepper.model),
        "memory_before": memory_before,
        "peak": peak,
        "load": os.getloadavg()[0],
    }
    if args.flops:  # after the memory reading: counting allocates too
        result["flops"] = count_flops(stepper, args)
    return result


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def count_flops(stepper: Stepper, args: argparse.Namespace) -> int:
    """Model FLOPs of one training step: forward + backward of one sample, counted, times the batch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    latents, timesteps, context, target = make_inputs(args, 1, stepper.device)
    stepper.model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        with autocast_context(stepper.device, stepper.dtype):
            prediction = forward(stepper.name, stepper.model, latents, timesteps, context)
        F.mse_loss(prediction.float(), target).backward()
    stepper.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * args.batch


# -- the comparison (parent process) ----------------------------------------------------------------------------------


def run_subprocess(worker: str, argv: list[str], weights: str) -> dict[str, Any]:
    return run_worker(os.path.abspath(__file__), [*argv, "--worker", worker, "--weights", weights], worker)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        report(run_worker_here(args))
        return 0

    device = torch.device(args.device)
    config = unet_config(args)
    have_diffusers = not args.ours_only and importlib.util.find_spec("diffusers") is not None
    names = ["ours", "diffusers"] if have_diffusers else ["ours"]
    interleave = args.interleave and have_diffusers
    print(
        f"torch {torch.__version__}, {args.threads} threads, device {device}, dtype {args.dtype}, "
        f"{'full SD 1.5' if args.full else 'SD 1.5 shape'}: width {args.model_channels}, context "
        f"{args.context_tokens}x{args.context_dim}, latents {args.batch}x4x{args.latent_size}x{args.latent_size}, "
        f"checkpointing {'on' if args.checkpointing else 'off'}, load {os.getloadavg()[0]:.2f}"
    )
    ok = True
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # (wall, CPU) per step
    flops: dict[str, int] = {}
    memory: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as folder:
        from safetensors.torch import save_file

        weights = str(Path(folder) / "unet.safetensors")
        save_file(randomised_weights(config, args.seed), weights)
        if have_diffusers:
            check = run_subprocess("check", argv, weights)
            same = check["relative_error"] <= OUTPUT_TOLERANCE[DTYPES[args.dtype]]
            ok &= same
            print(f"{'PASS' if same else 'FAIL'} outputs match: relative max error {check['relative_error']:.2e}")
        if interleave:
            timing = run_subprocess("interleaved", argv, weights)
            times, flops = timing["times"], timing.get("flops", {})
            print(f"  interleaved timing: {args.iters} steps of each, load {timing['load']:.2f}", flush=True)
            # Memory alone: one warm-up step and one more reach the peak (AdamW state exists from the first).
            memory_argv = argv + ["--warmup", "1", "--iters", "1", "--no-flops"]
            for name in names:
                memory[name].append(run_subprocess(name, memory_argv, weights))
        else:
            for round_index in range(args.rounds):
                for name in names if round_index % 2 == 0 else reversed(names):
                    round_argv = argv + (["--no-flops"] if round_index > 0 else [])
                    run = run_subprocess(name, round_argv, weights)
                    memory[name].append(run)
                    times[name].extend(run["times"])
                    if "flops" in run:
                        flops[name] = run["flops"]
                    print(
                        f"  round {round_index + 1} {name:<9} median {statistics.median(t[0] for t in run['times']):.3f} s/step, "
                        f"load {run['load']:.2f}",
                        flush=True,
                    )

    counts = {name: runs[0]["parameters"] for name, runs in memory.items()}
    for name, count in counts.items():
        print(f"{name + ':':<10} {count:,} parameters")
    if have_diffusers:
        same = counts["ours"] == counts["diffusers"]
        ok &= same
        print(f"{'PASS' if same else 'FAIL'} parameter count: equal: {same}; all weights loaded by name (strict)")

    # On CPU the verdict compares CPU seconds: other processes on the machine stretch wall-clock steps at random
    # (identical models measured 14 % apart in wall time, 0.2 % apart in CPU time), not the CPU work of a step.
    use_cpu_time = device.type == "cpu"
    memory_kind = "CUDA allocated" if device.type == "cuda" else "RSS"
    print(f"\n{'model':<10} {'wall s':>8} {'min':>7} {'max':>7} {'CPU s':>7} {'samples/s':>10} "
          f"{'peak MiB':>9} {'step MiB':>9}" + ("  GFLOP/step  TFLOP/s     MFU" if flops else ""))  # fmt: skip
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        wall = [step[0] for step in times[name]]
        cpu = [step[1] for step in times[name]]
        median, cpu_median = statistics.median(wall), statistics.median(cpu)
        peak = max(run["peak"] for run in memory[name])
        step_memory = max(run["peak"] - run["memory_before"] for run in memory[name])
        summary[name] = {"wall": median, "cpu": cpu_median, "step_memory": step_memory}
        line = (
            f"{name:<10} {median:8.3f} {min(wall):7.3f} {max(wall):7.3f} {cpu_median:7.3f} "
            f"{args.batch / median:10.2f} {mebibytes(peak):>9} {mebibytes(step_memory):>9}"
        )
        if name in flops:
            achieved = flops[name] / median / 1e12
            mfu = f"{achieved / args.peak_tflops:7.1%}" if args.peak_tflops else "      -"
            line += f"  {flops[name] / 1e9:10.1f}  {achieved:7.3f} {mfu}"
        print(line)
    print("(wall and CPU: medians per step; samples/s and TFLOP/s from the wall median; peak: the "
          f"{memory_kind} high-water mark of the model's own process; step: its growth over the state before the "
          "first step)")  # fmt: skip
    if flops and args.peak_tflops:
        print(f"MFU against {args.peak_tflops:g} TFLOP/s peak")
    if have_diffusers:
        wall_ratio = summary["diffusers"]["wall"] / summary["ours"]["wall"]
        cpu_ratio = summary["diffusers"]["cpu"] / summary["ours"]["cpu"]
        ratio = cpu_ratio if use_cpu_time else wall_ratio
        verdict = "PASS" if ratio >= TIME_TARGET else "FAIL"
        measure = "CPU time" if use_cpu_time else "wall time"
        print(
            f"{verdict} step time ({measure}): ours {ratio:.3f}x diffusers' speed (target >= {TIME_TARGET:.2f}x); "
            f"wall-clock ratio {wall_ratio:.3f}x" + (f", CPU-time ratio {cpu_ratio:.3f}x" if not use_cpu_time else "")
        )
        memory_ratio = summary["ours"]["step_memory"] / summary["diffusers"]["step_memory"]
        verdict = "PASS" if memory_ratio <= MEMORY_ALLOWANCE[device.type] else "FAIL"
        print(
            f"{verdict} step memory: ours {mebibytes(summary['ours']['step_memory'])} MiB = {memory_ratio:.3f}x "
            f"diffusers' {mebibytes(summary['diffusers']['step_memory'])} MiB "
            f"(target <= {MEMORY_ALLOWANCE[device.type]:.2f}x)"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
