"""Data pipeline throughput: our loader against a bare Pillow loop on the same shards.

    python tools/bench/data_pipeline.py --samples 2000 --workers 2 --repeats 3
    python tools/bench/data_pipeline.py --workers 0 --profile     # where the time goes, in one process

**Ours** is the training path: :class:`~trainer.data.ShardDataset` in exact mode (with its default
shuffle buffer) and :class:`~trainer.data.ShardLoader` with ``--workers`` worker processes, decoding
JPEGs with draft-mode reduction, ``ImageTransform(size=OUT, crop="center", normalize="clip")``, and
collating ``--batch-size`` batches with captions, keys and metadata.

**Raw** is the upper bound: a ``multiprocessing.Pool`` of the same number of processes, each reading
its share of the same tar files with :mod:`tarfile` and doing the same per-image work inline with
Pillow and NumPy (open, JPEG draft reduction as ``decode_image`` does it, RGB, bicubic resize of the
shorter side, center crop, float32 / 255, minus mean, over std). It only counts the results.

Shards of synthetic ~``--image-size`` px JPEGs (quality 90; smooth gradients, waves, shapes and
texture, so the files are the size of photos, not of noise) are written once with
:class:`~trainer.data.ShardWriter`, into a temporary folder or into ``--shard-dir`` where a later run
reuses them. After one warm-up run of each (imports, page cache), ``--repeats`` timed runs of ours
and raw alternate (ours first in odd runs, raw first in even ones), and the medians are compared.
The exit status is 0 whatever the ratio: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's trainer, installed or not

from trainer.data import ImageTransform, ShardDataset, ShardLoader, ShardWriter, decode_image  # noqa: E402
from trainer.data.transforms import NORMALIZATIONS  # noqa: E402

PREFIX = "bench"
QUALITY = 90
TARGET = 0.80  # ours must reach this share of the raw bound


# -- synthetic shards ------------------------------------------------------------------------------


def synthetic_jpeg(index: int, image_size: int, seed: int = 0) -> bytes:
    """One structured image, one side ``image_size`` and the other 0.75..1.25 of it, as JPEG bytes.

    A colour gradient, two low-frequency waves, a few rectangles and ellipses, blocky mid-frequency
    texture and a little pixel noise: at quality 90 these compress like photos (~60 KB at 512 px).
    """
    rng = np.random.default_rng((seed, index))
    other = int(rng.integers(round(0.75 * image_size), round(1.25 * image_size) + 1))
    width, height = (image_size, other) if rng.random() < 0.5 else (other, image_size)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]  # (1, W, 1)
    corners = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    pixels = corners[0] + (corners[1] - corners[0]) * x + (corners[2] - corners[0]) * y  # (H, W, 3)
    for _ in range(2):
        fx, fy = rng.uniform(0.5, 4.0, 2)
        amplitude = rng.uniform(10, 40, 3).astype(np.float32)
        pixels += amplitude * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.integers(4, 10))):
        color = rng.uniform(0, 255, 3).astype(np.float32)
        x0, x1 = np.sort(rng.integers(0, width, 2))
        y0, y1 = np.sort(rng.integers(0, height, 2))
        if rng.random() < 0.5:
            pixels[y0:y1, x0:x1] = pixels[y0:y1, x0:x1] * 0.3 + color * 0.7
        else:
            cx, cy = (x0 + x1) / (2 * width), (y0 + y1) / (2 * height)
            rx, ry = max(x1 - x0, 8) / (2 * width), max(y1 - y0, 8) / (2 * height)
            inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0  # (H, W, 1)
            pixels = np.where(inside, color, pixels)
    texture = rng.standard_normal((height // 4 + 1, width // 4 + 1, 3), dtype=np.float32) * 8.0
    pixels += np.repeat(np.repeat(texture, 4, axis=0), 4, axis=1)[:height, :width]
    pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * 2.5
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def _synthetic_jpeg_star(task: tuple[int, int]) -> bytes:
    return synthetic_jpeg(*task)


def ensure_shards(shard_dir: Path, samples: int, image_size: int, shards: int, processes: int) -> list[str]:
    """Write the benchmark shards into ``shard_dir`` unless a matching set is already there; return their paths."""
    params = {"samples": samples, "image_size": image_size, "shards": shards, "quality": QUALITY, "version": 1}
    params_path = shard_dir / f"{PREFIX}.params.json"
    manifest_path = shard_dir / f"{PREFIX}.manifest.json"
    if params_path.exists() and manifest_path.exists() and json.loads(params_path.read_text()) == params:
        manifest = json.loads(manifest_path.read_text())
        print(f"reusing {len(manifest['shards'])} shards in {shard_dir}")
    else:
        start = time.perf_counter()
        for old in shard_dir.glob(f"{PREFIX}-*.tar"):
            old.unlink()
        per_shard = math.ceil(samples / shards)
        tasks = [(i, image_size) for i in range(samples)]
        with mp.Pool(max(1, processes)) as pool, ShardWriter(shard_dir, PREFIX, samples_per_shard=per_shard) as writer:
            for i, data in enumerate(pool.imap(_synthetic_jpeg_star, tasks, chunksize=8)):
                writer.write(f"{PREFIX}{i:06d}", data, f"synthetic benchmark image {i}", {"index": i}, image_ext="jpg")
        manifest = writer.manifest
        params_path.write_text(json.dumps(params))
        print(f"wrote {len(manifest['shards'])} shards to {shard_dir} in {time.perf_counter() - start:.1f} s")
    return [str(shard_dir / shard["url"]) for shard in manifest["shards"]]


def describe_shards(paths: list[str]) -> str:
    """Shard count, total size and mean JPEG size and dimensions."""
    sizes, widths, heights = [], [], []
    for path in paths:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    sizes.append(len(data))
                    with Image.open(io.BytesIO(data)) as image:
                        widths.append(image.width)
                        heights.append(image.height)
    total = sum(os.path.getsize(p) for p in paths)
    short = [min(w, h) for w, h in zip(widths, heights, strict=True)]
    return (
        f"{len(paths)} shards, {len(sizes)} JPEGs (q{QUALITY}), {total / 2**20:.0f} MiB; "
        f"mean JPEG {statistics.mean(sizes) / 1024:.0f} KiB, sides {min(short)}..{max(max(widths), max(heights))} px"
    )


# -- the two contenders ----------------------------------------------------------------------------


def raw_loop(paths: list[str], output_size: int, limit: int | None = None, keep: list | None = None) -> int:
    """The bare Pillow loop over ``paths``: the same per-image work as ours, inline; returns the sample count.

    ``limit`` and ``keep`` (a list that receives the (H, W, 3) arrays) are for the equivalence check only.
    """
    mean_values, std_values = NORMALIZATIONS["clip"]
    mean = np.asarray(mean_values, dtype=np.float32)
    std = np.asarray(std_values, dtype=np.float32)
    count = 0
    for path in paths:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                width, height = image.size
                scale = min(width, height) / output_size
                if scale >= 2:  # JPEG draft mode, the same power-of-two reduction decode_image asks for
                    image.draft("RGB", (max(1, round(width / scale)), max(1, round(height / scale))))
                if image.mode != "RGB":
                    image = image.convert("RGB")
                width, height = image.size
                scale = output_size / min(width, height)
                new_w, new_h = max(output_size, round(width * scale)), max(output_size, round(height * scale))
                image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
                left, top = (new_w - output_size) // 2, (new_h - output_size) // 2
                image = image.crop((left, top, left + output_size, top + output_size))
                array = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
                if keep is not None:
                    keep.append(array)
                count += 1
                if limit is not None and count >= limit:
                    return count
    return count


def _raw_loop_star(task: tuple[list[str], int]) -> int:
    return raw_loop(*task)


def run_raw(paths: list[str], workers: int, output_size: int) -> tuple[int, float]:
    """Time the raw loop over all shards with ``workers`` processes (0: in this process)."""
    start = time.perf_counter()
    if workers == 0:
        count = raw_loop(paths, output_size)
    else:
        with mp.Pool(workers) as pool:
            count = sum(pool.map(_raw_loop_star, [(paths[w::workers], output_size) for w in range(workers)]))
    return count, time.perf_counter() - start


def make_loader(paths: list[str], workers: int, batch_size: int, output_size: int) -> ShardLoader:
    """Our training data path for these shards: exact mode, center crop, CLIP normalization."""
    dataset = ShardDataset(
        paths,
        batch_size=batch_size,
        mode="exact",
        transform=ImageTransform(size=output_size, crop="center", normalize="clip"),
        num_workers=workers,
    )
    return ShardLoader(dataset, num_workers=workers)


def run_ours(paths: list[str], workers: int, batch_size: int, output_size: int) -> tuple[int, float]:
    """Time one epoch of our loader (worker start-up included, as the raw pool's is)."""
    loader = make_loader(paths, workers, batch_size, output_size)
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += batch["image"].shape[0]
    return count, time.perf_counter() - start


def check_equivalence(paths: list[str], output_size: int, n: int = 16) -> float:
    """Largest absolute difference between ours and the raw loop on the first ``n`` images of a shard."""
    raw: list[np.ndarray] = []
    raw_loop(paths[:1], output_size, limit=n, keep=raw)
    transform = ImageTransform(size=output_size, crop="center", normalize="clip")
    worst = 0.0
    with tarfile.open(paths[0], "r|") as tar:
        jpegs = (tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))
        for expected, data in zip(raw, jpegs, strict=False):
            ours = transform(decode_image(data, min_side=output_size)).numpy().transpose(1, 2, 0)  # (H, W, 3)
            worst = max(worst, float(np.abs(ours - expected).max()))
    return worst


def profile(paths: list[str], batch_size: int, output_size: int, top: int = 25) -> None:
    """cProfile ours and raw in this process and print the functions with the most own time."""
    for name, call in (
        ("ours", lambda: run_ours(paths, 0, batch_size, output_size)),
        ("raw", lambda: run_raw(paths, 0, output_size)),
    ):
        profiler = cProfile.Profile()
        profiler.enable()
        count, seconds = call()
        profiler.disable()
        print(f"\n== profile of {name}, 1 process: {count} samples in {seconds:.2f} s (under the profiler)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


# -- main ------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="images in the shard set (default: 2000)")
    parser.add_argument("--image-size", type=int, default=512, help="one side of the JPEGs, px (default: 512)")
    parser.add_argument("--output-size", type=int, default=256, help="side of the crops, px (default: 256)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers = raw processes; 0: in-process")
    parser.add_argument("--batch-size", type=int, default=64, help="our batch size (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each after the warm-up (default: 3)")
    parser.add_argument("--shards", type=int, default=8, help="shard count, a multiple of --workers (default: 8)")
    parser.add_argument("--shard-dir", type=Path, default=None, help="write/reuse shards here (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="only cProfile ours and raw in one process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 0 or args.repeats < 1 or args.samples < args.shards:
        print("need --workers >= 0, --repeats >= 1 and --samples >= --shards", file=sys.stderr)
        return 2
    if args.workers > 0 and args.shards % args.workers:
        print(f"note: {args.shards} shards do not split evenly over {args.workers} workers", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shard_dir = args.shard_dir or Path(tmp)
        shard_dir.mkdir(parents=True, exist_ok=True)
        paths = ensure_shards(shard_dir, args.samples, args.image_size, args.shards, max(1, args.workers))
        print(describe_shards(paths))
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load average {load_average()}")
        print(
            f"settings: workers={args.workers} batch_size={args.batch_size} output={args.output_size} px, "
            f"ImageTransform(crop='center', normalize='clip'), exact mode"
        )
        difference = check_equivalence(paths, args.output_size)
        print(f"ours vs raw on 16 images: max |difference| = {difference:.2e} (same work: ~0)")

        if args.profile:
            profile(paths, args.batch_size, args.output_size)
            return 0

        ours: list[float] = []
        raw: list[float] = []
        header = f"{'run':<8} {'ours s':>8} {'ours img/s':>11} {'raw s':>8} {'raw img/s':>10} {'ours/raw':>9}"
        print(header)
        print("-" * len(header))
        for run in range(args.repeats + 1):  # run 0 is the warm-up
            order = ("ours", "raw") if run % 2 == 1 or run == 0 else ("raw", "ours")
            results = {}
            for which in order:
                if which == "ours":
                    results[which] = run_ours(paths, args.workers, args.batch_size, args.output_size)
                else:
                    results[which] = run_raw(paths, args.workers, args.output_size)
                if results[which][0] != args.samples:
                    print(f"warning: {which} saw {results[which][0]} samples, expected {args.samples}")
            (n_ours, t_ours), (n_raw, t_raw) = results["ours"], results["raw"]
            rate_ours, rate_raw = n_ours / t_ours, n_raw / t_raw
            label = "warm-up" if run == 0 else str(run)
            print(
                f"{label:<8} {t_ours:>8.2f} {rate_ours:>11.1f} {t_raw:>8.2f} {rate_raw:>10.1f} "
                f"{rate_ours / rate_raw:>9.3f}"
            )
            if run > 0:
                ours.append(rate_ours)
                raw.append(rate_raw)
        median_ours, median_raw = statistics.median(ours), statistics.median(raw)
        ratio = median_ours / median_raw
        print("-" * len(header))
        print(f"{'median':<8} {'':>8} {median_ours:>11.1f} {'':>8} {median_raw:>10.1f} {ratio:>9.3f}")
        print(f"load average after: {load_average()}")
        verdict = "PASS" if ratio >= TARGET else "FAIL (ours is below the target share of the raw bound)"
        print(f"ratio ours/raw = {ratio:.2f} (target >= {TARGET:.2f}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
