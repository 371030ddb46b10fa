"""The end-to-end demo on the embedded shapes data: ``python -m trainer.demo`` (``--fast`` for a
short run).

1. makes the shapes shards if they are missing;
2. trains CLIP (``shapes_clip``), the autoencoder (``shapes_autoencoder``) and the latent diffusion
   UNet (``shapes_ldm``, conditioned on that CLIP's text tower, in that autoencoder's latent space)
   as ordinary Hydra runs of ``python -m trainer.train``, each in its own folder under ``--out``; CLIP
   and the autoencoder, which do not depend on each other, at the same time with half the cores each;
3. samples held-out prompts (attribute combinations drawn from a seed stream the training data never
   used, captions from the dataset's templates), evaluates every image with the segmentation-based
   shapes evaluator, and prints a summary table: the stages, their times, their metrics.

Written under ``--out``: ``samples/NNNN.png``, ``samples/prompts.jsonl`` (file, prompt, attributes,
seed), ``samples/grid.png`` (labelled), ``samples/trajectory.png`` (one image emerging from noise),
``report.json`` (evaluation) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.data.shapes import ensure_shapes, make_caption, render, sample_attributes

# (training steps, validate every) per stage, dataset sizes, held-out prompts and sampling steps: the full demo
# aims at <= 15 minutes on 2 CPU cores, --fast at <= 3. Each stage validates at its last step.
SCHEDULES = {
    "full": {
        "clip": (800, 800),
        "autoencoder": (7200, 2400),
        "ldm": (5000, 2500),
        "train": 20000,
        "val": 1000,
        "prompts": 64,
        "steps": 20,
    },
    "fast": {
        "clip": (40, 40),
        "autoencoder": (200, 200),
        "ldm": (60, 60),
        "train": 1000,
        "val": 200,
        "prompts": 8,
        "steps": 8,
    },
}
FIELDS = ("color", "shape", "position", "size")


def _follow(
    process: subprocess.Popen, sink, name: str, prefix: str, lock: threading.Lock, ended: dict, every: float = 15.0
) -> None:
    """Copy a stage's output to its log and show it: every line but progress-bar updates, which are shown once
    every ``every`` seconds (the last 160 characters). Records when the stage ended in ``ended[name]``."""
    shown = 0.0
    for line in process.stdout:
        sink.write(line)
        progress = "it/s" in line or "s/it" in line
        if line.startswith(("\r", " ")) and "Epoch" not in line or progress and time.monotonic() - shown < every:
            continue
        shown = time.monotonic() if progress else shown
        with lock:
            print(prefix + line.rstrip()[-160:], flush=True)
    process.wait()
    ended[name] = time.perf_counter()


def run_stages(
    stages: dict[str, tuple[str, Path, list[str]]], logs: Path, threads: int | None = None
) -> dict[str, float]:
    """Run stages (name -> experiment, run folder, overrides) as ordinary Hydra runs, all at once, each with
    ``threads`` intra-op threads; their output is shown (prefixed by the name when several run) and kept in
    ``logs/<name>.log``. Returns each stage's wall time in seconds."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    lock, ended = threading.Lock(), {}
    running = []
    for name, (experiment, out, overrides) in stages.items():
        command = [sys.executable, "-m", "trainer.train", f"experiment={experiment}", f"hydra.run.dir={out}"]
        command += overrides
        print(f"\n=== {experiment}: {' '.join(command[2:])}", flush=True)
        sink = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed below, after the process ends
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        )
        prefix = f"[{name}] " if len(stages) > 1 else ""
        reader = threading.Thread(target=_follow, args=(process, sink, name, prefix, lock, ended), daemon=True)
        reader.start()
        running.append((name, experiment, process, reader, sink, time.perf_counter()))
    times, failed = {}, []
    for name, experiment, process, reader, sink, started in running:
        reader.join()
        sink.close()
        times[name] = ended[name] - started
        if process.returncode != 0:
            failed.append(f"stage {experiment} failed (exit {process.returncode}); see {logs / f'{name}.log'}")
    if failed:
        raise SystemExit("error: " + "; ".join(failed))
    return times


def cache_latents(runs: dict[str, Path], data: Path, out: Path, log: Path, per_shard: int, device: str = "cpu") -> Path:
    """Encode the train split once with the trained autoencoder and text tower (``tools/cache_latents.py``), so
    the diffusion stage runs only its UNet; returns the cache's manifest."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "cache_latents.py"
    command = [
        sys.executable,
        str(tool),
        "--autoencoder",
        str(runs["autoencoder"] / "export" / "autoencoder.safetensors"),
    ]
    command += ["--text-encoder", str(runs["clip"] / "export" / "clip"), "--urls", str(data / "train.manifest.json")]
    command += ["--image-size", "64", "--batch-size", "100", "--samples-per-shard", str(per_shard), "--out", str(out)]
    command += ["--device", device]
    with open(log, "w") as sink:
        if subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"error: caching latents failed; see {log}")
    return out / "train.manifest.json"


def last_metrics(run: Path) -> dict[str, float]:
    """The last logged value of every metric of a run's CSV log."""
    files = sorted(run.rglob("metrics.csv"))
    values: dict[str, float] = {}
    if files:
        with open(files[-1]) as f:
            for row in csv.DictReader(f):
                values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def held_out_prompts(count: int, seed: int = 10_000) -> list[dict]:
    """Attribute combinations from a seed stream the generator's train/val splits never use."""
    prompts = []
    for index in range(count):
        rng = random.Random(f"demo:{seed}:{index}")
        attributes = sample_attributes(rng)
        prompts.append({"prompt": make_caption(attributes, 0), "attributes": attributes, "seed": index})
    return prompts


def reconstruction_reference(autoencoder_export: Path, count: int) -> dict[str, float]:
    """The shapes evaluator's accuracy on the autoencoder's reconstructions of the held-out prompts' images,
    drawn by the generator: a reference for the samples, which that autoencoder decodes (they can hardly
    do better than the autoencoder does on the true images, though nothing forbids it)."""
    import numpy as np

    from trainer.checkpoints import load_vae_weights, read_vae_config
    from trainer.eval.shapes import evaluate
    from trainer.models.autoencoder import AutoencoderKL

    autoencoder = AutoencoderKL.from_config(read_vae_config(autoencoder_export))
    load_vae_weights(autoencoder, autoencoder_export)
    prompts = held_out_prompts(count)
    pixels = np.stack([np.asarray(render(p["attributes"])) for p in prompts])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        reconstructions = autoencoder.eval().decode(autoencoder.encode(images).mode())
    expected = [{k: p["attributes"][k] for k in FIELDS} for p in prompts]
    return evaluate([to_pil(r) for r in reconstructions], expected)["accuracy"]


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int = 8) -> Image.Image:
    """Images in a grid with their prompt (wrapped) under each."""
    size = images[0].width
    cell_h = size + 36
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * max(size, 128), rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    width = max(size, 128)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * width, (i // columns) * cell_h
        grid.paste(image, (x + (width - size) // 2, y))
        draw.multiline_text((x + 2, y + size + 1), "\n".join(textwrap.wrap(label, 22)[:3]), fill="black", spacing=0)
    return grid


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def sample_and_evaluate(checkpoint: Path, out: Path, count: int, steps: int, device: str = "cpu") -> dict:
    from trainer.eval.shapes import evaluate
    from trainer.generate import load_checkpoint_pipeline

    pipeline = load_checkpoint_pipeline(str(checkpoint), device=device)
    prompts = held_out_prompts(count)
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    images: list[Image.Image] = []
    for start in range(0, count, 16):
        chunk = prompts[start : start + 16]
        generated = pipeline.generate(
            [p["prompt"] for p in chunk], steps=steps, guidance=3.0, seeds=[p["seed"] for p in chunk]
        )
        images += [to_pil(image) for image in generated]
    with open(samples / "prompts.jsonl", "w") as index:
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            image.save(samples / f"{i:04d}.png")
            fields = {k: prompt["attributes"][k] for k in FIELDS}
            index.write(
                json.dumps(
                    {"file": f"{i:04d}.png", "prompt": prompt["prompt"], "attributes": fields, "seed": prompt["seed"]}
                )
                + "\n"
            )
    labelled_grid(images, [p["prompt"] for p in prompts]).save(samples / "grid.png")
    frames: list[torch.Tensor] = []
    final = pipeline.generate(
        [prompts[0]["prompt"]],
        steps=steps,
        guidance=3.0,
        seeds=[prompts[0]["seed"]],
        callback=lambda step, x, denoised: frames.append(pipeline.decode_latents(x)[0]),
    )
    to_pil(torch.cat([*frames, final[0]], dim=2)).save(samples / "trajectory.png")
    report = evaluate(images, [{k: p["attributes"][k] for k in FIELDS} for p in prompts])
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 mixed precision trains the demo's
    CLIP 1.4x and its autoencoder 1.2x faster, to the same metrics (docs/benchmarks.md). Elsewhere (no such
    flags, or no /proc/cpuinfo) oneDNN emulates bf16, which can be slower than float32."""
    try:
        flags = {
            word for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags") for word in line.split()
        }
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def stage_precision(choice: str, cpuinfo: str | Path = "/proc/cpuinfo", device: str = "cpu") -> str:
    """The ``trainer.precision`` of the demo's CLIP and autoencoder stages for ``--precision``: ``auto`` is
    bf16-mixed on an x86 CPU with native bf16 (:func:`native_bf16`), else 32-true (other CPUs, ARM included);
    on a GPU, bf16-mixed where it computes bf16 (Ampere and later), else 16-mixed."""
    if choice != "auto":
        return choice
    if device == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if native_bf16(cpuinfo) else "32-true"


def demo_device(choice: str) -> str:
    """``--device``: ``auto`` is the GPU when torch sees one, else the CPU; asking for ``cuda`` without one is an
    error that says so."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    return choice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where the stages, samples and reports go")
    parser.add_argument("--fast", action="store_true", help="a short run (minutes) that exercises every step")
    parser.add_argument(
        "--data", default=None, help="shapes shard folder (default: data/shapes/shards, or under --out with --fast)"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "32-true", "bf16-mixed", "16-mixed"),
        default="auto",
        help="of CLIP and the autoencoder (auto: bf16-mixed on x86 CPUs with native bf16, else 32-true; on a GPU "
        "bf16-mixed, or 16-mixed before Ampere); on the CPU the LDM trains in float32, where bf16 gains nothing",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where every stage trains and samples (auto: the GPU when torch sees one, else the CPU)",
    )
    parser.add_argument(
        "--ldm-steps",
        type=int,
        default=None,
        metavar="N",
        help="train the UNet for N steps instead of the schedule's (full: 5000, about 5.3 minutes on 2 CPU cores; "
        "it read generated shape 0.89 on 64 prompts, 0.86 on 256; docs/benchmarks.md, 'Tenth round')",
    )
    args = parser.parse_args(argv)
    device = demo_device(args.device)
    if device == "cpu" and args.precision == "16-mixed":
        parser.error("--precision 16-mixed is for GPUs; on the CPU use bf16-mixed or 32-true")
    precision = stage_precision(args.precision, device=device)
    plan = dict(SCHEDULES["fast" if args.fast else "full"])
    if args.ldm_steps is not None:
        if args.ldm_steps < 1:
            parser.error(f"--ldm-steps must be at least 1, got {args.ldm_steps}")
        # validated halfway (when that is a whole step) and at the end
        plan["ldm"] = (args.ldm_steps, args.ldm_steps // 2 if args.ldm_steps % 2 == 0 else args.ldm_steps)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data = Path(args.data) if args.data else (out / "shards" if args.fast else Path("data/shapes/shards"))
    print(f"=== shapes data: {data}", flush=True)
    t = time.perf_counter()
    per_shard = max(plan["train"] // 40, 25)  # 40 shards: enough for the readers of any stage
    ensure_shapes(data, n_train=plan["train"], n_val=plan["val"], samples_per_shard=per_shard)
    times = {"data": time.perf_counter() - t}
    shards = [
        "data.prepare=null",
        f"data.train.urls={data.resolve()}/train.manifest.json",
        f"data.val.urls={data.resolve()}/val.manifest.json",
        "logger=csv",
    ]
    if device == "cuda":  # the shapes experiments name trainer: cpu
        shards.append("trainer.accelerator=gpu")
    fast = ["trainer.limit_val_batches=2"] if args.fast else []

    def schedule(stage: str) -> list[str]:
        steps, every = plan[stage]
        return [
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={every}",
            "trainer.check_val_every_n_epoch=null",
            # checkpoints where it validates, so last.ckpt, which is sampled, holds the last step
            f"callbacks.checkpoint.every_n_train_steps={every}",
        ]

    runs = {name: out / name for name in ("clip", "autoencoder", "ldm")}
    # CLIP and the autoencoder do not depend on each other: they train at the same time, one thread each on a
    # 2-core machine (small models use one core better than they share two), each with one data worker
    threads = max(1, (os.cpu_count() or 2) // 2)
    workers = 1 if device == "cpu" else min(4, threads)  # on a GPU the loaders, not the model, need the cores
    both = [f"data.num_workers={workers}", f"trainer.precision={precision}"]
    first = {
        "clip": ("shapes_clip", runs["clip"], [*shards, *fast, *both, *schedule("clip")]),
        "autoencoder": (
            "shapes_autoencoder",
            runs["autoencoder"],
            [*shards, *fast, *both, *schedule("autoencoder")],
        ),
    }
    times.update(run_stages(first, out, threads))
    print("\n=== caching latents and text embeddings of the train split", flush=True)
    t = time.perf_counter()
    latents = cache_latents(runs, data, out / "latents", out / "latents.log", per_shard, device)
    times["latents"] = time.perf_counter() - t
    ldm = [
        *(o for o in shards if not o.startswith("data.train.urls=")),
        *fast,
        f"data.train.urls={latents}",
        # one loader worker on the CPU, as above: it keeps up with the UNet (cached latents need no decoding), and a
        # second one only takes turns with the UNet's two threads (13.3 against 14.9 steps/s, docs/benchmarks.md)
        f"data.num_workers={workers}",
        *schedule("ldm"),
        f"task.text_encoder.source={runs['clip']}/export/clip",
        f"task.autoencoder.checkpoint={runs['autoencoder']}/export/autoencoder.safetensors",
    ]
    if device == "cuda":  # on the CPU the LDM's tiny UNet gains nothing from bf16
        ldm.append(f"trainer.precision={precision}")
    times.update(run_stages({"ldm": ("shapes_ldm", runs["ldm"], ldm)}, out))

    print("\n=== sampling and evaluating held-out prompts", flush=True)
    t = time.perf_counter()
    report = sample_and_evaluate(runs["ldm"] / "checkpoints" / "last.ckpt", out, plan["prompts"], plan["steps"], device)
    reference = reconstruction_reference(runs["autoencoder"] / "export" / "autoencoder.safetensors", plan["prompts"])
    times["sample+eval"] = time.perf_counter() - t

    clip, autoencoder, diffusion = (last_metrics(runs[k]) for k in ("clip", "autoencoder", "ldm"))
    rows = [
        ("data", times["data"], f"{plan['train']} train / {plan['val']} val images"),
        (
            "clip",
            times["clip"],
            "zero-shot colour {:.3f}, shape {:.3f}; R@1 {:.3f}".format(
                clip.get("val/zero_shot_color_accuracy", float("nan")),
                clip.get("val/zero_shot_shape_accuracy", float("nan")),
                clip.get("val/image_to_text_R@1", float("nan")),
            ),
        ),
        (
            "autoencoder",
            times["autoencoder"],
            "PSNR {:.2f} dB, SSIM {:.3f}, scale factor {:.4f}; its reconstructions read {}".format(
                autoencoder.get("val/psnr", float("nan")),
                autoencoder.get("val/ssim", float("nan")),
                autoencoder.get("val/scale_factor", float("nan")),
                " ".join(f"{k} {reference[k]:.2f}" for k in FIELDS),
            ),
        ),
        ("latents", times["latents"], "train split encoded once: the LDM stage runs only its UNet"),
        ("ldm", times["ldm"], "val loss {:.4f}".format(diffusion.get("val/loss", float("nan")))),
        (
            "sample+eval",
            times["sample+eval"],
            " ".join(f"{k} {report['accuracy'][k]:.3f}" for k in FIELDS) + f" ({report['images']} held-out prompts)",
        ),
    ]
    total = time.perf_counter() - started
    print("\n| stage | time | metrics |\n| --- | ---: | --- |")
    for stage, seconds, metrics in rows:
        print(f"| {stage} | {seconds / 60:.1f} min | {metrics} |")
    print(f"| total | {total / 60:.1f} min | outputs in {out} |")
    print("(clip and autoencoder trained at the same time, so the total is less than the sum)")
    summary = {
        "times_s": times,
        "total_s": total,
        "precision": precision,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "steps": {stage: plan[stage][0] for stage in ("clip", "autoencoder", "ldm")},
        "clip": clip,
        "autoencoder": autoencoder,
        "ldm": diffusion,
    }
    summary["evaluation"] = report["accuracy"]
    summary["reconstructions"] = reference  # the evaluator on the autoencoder's reconstructions
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
