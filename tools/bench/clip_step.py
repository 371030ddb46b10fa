"""CLIP training throughput: our CLIPTask under Lightning against open_clip's own training loop.

    python tools/bench/clip_step.py                                  # CPU: tiny CLIP, 64 px, batch 64
    python tools/bench/clip_step.py --repeats 4 --workers 1 --threads 1
    python tools/bench/clip_step.py --profile                        # ours once, cProfile of the timed steps
    python tools/bench/clip_step.py --device cuda --precision amp_bf16 --batch-size 256 --workers 8 \\
        --threads 8 --steps 300 --warmup 50

Both sides train the same open_clip model (``--model-config``, default ``configs/model/clip/tiny.yaml``
with ``data.image_size`` set to ``--image-size``) with the same batch size, precision, number of data
workers, torch thread count, optimizer settings (AdamW, lr 5e-4, wd 0.2, betas 0.9/0.98, eps 1e-6,
linear warmup then cosine) and the same shards:

**Ours** is :class:`~trainer.tasks.clip.CLIPTask` fed by :class:`~trainer.datamodule.ShardDataModule`
(exact mode, tokenization in the workers, the default ``DataStatsLogger`` callback) under a Lightning
``Trainer`` with no logger, no checkpointing, no progress bar and ``log_every_n_steps=10``.

**open_clip** is ``open_clip_train.main.main`` with ``--dataset-type webdataset``, run by the Python of
its own environment (``--open-clip-python``): ``open_clip_torch[training]`` pins ``webdataset<=0.2.86``
and ours uses webdataset 1.x. It logs a line at the end of every step (``--log-every-n-steps 1``); a
logging handler added by the driver notes the time of those lines, and nothing else of its code is
touched. Its default training augmentation (RandomResizedCrop, scale 0.9..1) is kept: that is what
its training code does. Its own per-step ``Data (t)`` figures are reported beside ours.

Each side runs in a fresh process; the first ``--warmup`` steps (start-up, worker spawn, shuffle
buffer fill, allocator warm-up) are not timed. Throughput is ``(steps - warmup) * batch_size`` over
the wall time from the end of step ``warmup - 1`` to the end of step ``steps - 1``, so data waits
count on both sides. Over the same window the CPU time of the training process and its data workers
is read from ``/proc``: CPU ms per sample is the work each side does, which a busy machine disturbs
far less than the wall time, and ``cores`` (CPU time / wall time) shows how much of the machine a run
got. Runs alternate (ours first in odd repeats, open_clip first in even ones); the verdict compares
the medians of samples/s. The shards are the embedded shapes dataset (``trainer.data.shapes``:
``key.jpg``, ``key.txt``, ``key.json``) rendered at ``--source-size`` px. The exit status is 0
whatever the ratio: this is a measurement, not a test.

Measure on a quiet machine (``uptime``): with as many torch threads as cores (the default), every
OpenMP barrier waits for a thread that a neighbouring job has pushed off its core, and steps get 5 to
20 times slower, erratically. If the machine cannot be had to itself, ``--threads 1`` still gives
usable figures, and the CPU ms per sample stay comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's trainer, installed or not

DEFAULT_MODEL_CONFIG = ROOT / "configs" / "model" / "clip" / "tiny.yaml"
DEFAULT_OPEN_CLIP_PYTHON = "/tmp/ocvenv/bin/python"
TARGET = 1.0  # ours / open_clip samples per second
SHARDS = 8
LR_WARMUP = 5  # learning-rate warmup steps (both sides)
OPTIMIZER = {"lr": 5e-4, "weight_decay": 0.2, "betas": (0.9, 0.98), "eps": 1e-6}
PRECISIONS = {"fp32": "32-true", "amp_bf16": "bf16-mixed", "amp": "16-mixed"}  # open_clip -> Lightning
RESULT = "BENCH_RESULT "

OPEN_CLIP_SETUP = """\
open_clip's training code was not found with {python}. Its environment is separate from ours because
open_clip_torch[training] pins webdataset<=0.2.86 (we use webdataset 1.x). Make it with:
    python -m venv /tmp/ocvenv
    /tmp/ocvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/ocvenv/bin/pip install 'open_clip_torch[training]==3.3.0'
then pass --open-clip-python /tmp/ocvenv/bin/python. Measuring ours only."""

# Run by open_clip's Python: register the model config (a json file), set the threads, note the time of
# the per-step log lines (open_clip logs at the end of each step) with this module's Marks, train.
OPEN_CLIP_DRIVER = """\
import json, logging, sys
import torch
import open_clip
from open_clip_train.main import main
bench_dir, config, threads, warmup, steps, *argv = sys.argv[1:]
sys.path.insert(0, bench_dir)
from clip_step import RESULT, Marks
torch.set_num_threads(int(threads))
if config:  # a custom architecture; a built-in name needs none
    open_clip.add_model_config(config)
marks = Marks(int(warmup), int(steps))
class Watch(logging.Handler):
    step = 0
    def emit(self, record):
        if record.getMessage().startswith("Train Epoch"):
            marks.step_end(self.step)
            self.step += 1
logging.getLogger().addHandler(Watch())
main(argv)
print(RESULT + json.dumps(marks.result()), flush=True)
"""

VERSIONS = """\
import json, torch, open_clip, webdataset
try:
    import open_clip_train
    train = True
except ImportError:
    train = False
print(json.dumps({"torch": torch.__version__, "open_clip": open_clip.__version__,
                  "webdataset": webdataset.__version__, "open_clip_train": train}))
"""

# "Train Epoch: 0 [ 128/3840 (3%)] Data (t): 0.012 Batch (t): 0.301, 212.6/s, 212.6/s/gpu LR: ..."
OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[.*?\] Data \(t\): (?P<data>[\d.]+) Batch \(t\): (?P<batch>[\d.]+),")


# -- timing (stdlib only: open_clip's driver imports it too) --------------------------------------


def family_cpu_seconds(pid: int | None = None) -> tuple[float, float]:
    """User + system CPU seconds of process ``pid`` (default: this one) and of its live descendants
    (its data workers), read from Linux's ``/proc``."""
    pid = pid or os.getpid()
    cpu: dict[int, float] = {}
    children: dict[int, list[int]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
        cpu[int(entry.name)] = (utime + stime) / tick
        children.setdefault(ppid, []).append(int(entry.name))
    descendants, todo = 0.0, list(children.get(pid, []))
    while todo:
        current = todo.pop()
        descendants += cpu.get(current, 0.0)
        todo.extend(children.get(current, []))
    return cpu.get(pid, 0.0), descendants


class Marks:
    """Wall time and CPU times (process, workers) at the end of steps ``warmup - 1`` and ``steps - 1``."""

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None] | None = None):
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.start: tuple[float, float, float] | None = None
        self.stop: tuple[float, float, float] | None = None

    def step_end(self, step: int) -> None:
        if step not in (self.warmup - 1, self.steps - 1):
            return
        if self.sync is not None:
            self.sync()
        mark = (time.perf_counter(), *family_cpu_seconds())
        if step == self.warmup - 1:
            self.start = mark
        else:
            self.stop = mark

    @property
    def done(self) -> bool:
        return self.start is not None and self.stop is not None

    def result(self) -> dict:
        if not self.done:
            return {}
        seconds, process, workers = (stop - start for start, stop in zip(self.start, self.stop, strict=True))
        return {"seconds": seconds, "process_cpu_seconds": process, "worker_cpu_seconds": workers}


def figures(marks: dict, steps: int, batch_size: int, wait_ms: float) -> dict:
    samples = steps * batch_size
    cpu_seconds = marks["process_cpu_seconds"] + marks["worker_cpu_seconds"]
    return {
        "samples_per_s": samples / marks["seconds"],
        "cpu_ms_per_sample": 1000 * cpu_seconds / samples,
        "worker_cpu_ms_per_sample": 1000 * marks["worker_cpu_seconds"] / samples,
        "cores": cpu_seconds / marks["seconds"],
        "wait_ms": wait_ms,
    }


# -- setup ---------------------------------------------------------------------------------------


def model_config(path: Path, image_size: int) -> tuple[str, dict | None]:
    """The model name and open_clip config dict (None for a built-in name such as ``ViT-B-32``) of a
    ``configs/model/clip`` file at ``image_size``."""
    from omegaconf import OmegaConf

    composed = OmegaConf.create({"data": {"image_size": image_size}, "model": OmegaConf.load(path)})
    model = OmegaConf.to_container(composed.model, resolve=True)
    return model["name"], model["config"]


def ensure_shards(shard_dir: Path, samples: int, source_size: int, shards: int) -> str:
    """Shapes shards ``train-000000.tar ...`` in ``shard_dir`` (reused when they match); a brace pattern."""
    from trainer.data.shapes import write_split

    per_shard = math.ceil(samples / shards)
    params = {"samples": per_shard * shards, "size": source_size, "samples_per_shard": per_shard}
    params_path = shard_dir / "bench_clip_step.json"
    if not (params_path.exists() and json.loads(params_path.read_text()) == params):
        params_path.unlink(missing_ok=True)
        started = time.perf_counter()
        write_split(shard_dir, "train", params["samples"], size=source_size, samples_per_shard=per_shard, workers=2)
        params_path.write_text(json.dumps(params))
        print(
            f"wrote {params['samples']} shapes samples ({source_size} px) in {shards} shards to {shard_dir} "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return str(shard_dir / f"train-{{000000..{shards - 1:06d}}}.tar")


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def open_clip_versions(python: str) -> dict | None:
    """Versions in open_clip's environment, or None when it lacks ``open_clip_train``."""
    if not Path(python).exists():
        return None
    done = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    return versions if versions.pop("open_clip_train") else None


# -- ours --------------------------------------------------------------------------------------


def train_ours(args: argparse.Namespace, urls: str, scratch: Path) -> dict:
    """Train ``args.steps`` steps with our task and data module in this process; the timed figures."""
    import torch

    torch.set_num_threads(args.threads)
    import pytorch_lightning as pl

    from trainer.callbacks.data_stats import DataStatsLogger
    from trainer.datamodule import ShardDataModule
    from trainer.tasks.clip import CLIPTask

    cuda = args.device == "cuda"

    class StepTimer(pl.Callback):
        """Marks the end of steps ``warmup - 1`` and ``steps - 1``; sums the gaps between one step's end
        and the next one's start over the timed steps (the data wait plus Lightning's work between
        steps); profiles the timed steps when given a profiler."""

        def __init__(self, profiler=None):
            self.marks = Marks(args.warmup, args.steps, torch.cuda.synchronize if cuda else None)
            self.profiler = profiler
            self.last_end = 0.0
            self.gaps: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if args.warmup <= batch_idx < args.steps:
                self.gaps.append(time.perf_counter() - self.last_end)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.marks.step_end(batch_idx)
            if self.profiler is not None and batch_idx == args.warmup - 1:
                self.profiler.enable()
            if self.profiler is not None and batch_idx == args.steps - 1:
                self.profiler.disable()
            self.last_end = time.perf_counter()

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    name, config = model_config(args.model_config, args.image_size)
    task = CLIPTask(
        model={"name": name, "config": config},
        optimizer=OPTIMIZER,
        scheduler={"warmup_steps": LR_WARMUP, "total_steps": args.steps},
        export=False,
    )
    datamodule = ShardDataModule(
        train={"urls": urls},
        batch_size=args.batch_size,
        num_workers=args.workers,
        image_size=args.image_size,
        tokenizer=task.tokenizer,
        seed=0,
    )
    timer = StepTimer(profiler)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=PRECISIONS[args.precision],
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        use_distributed_sampler=False,
        default_root_dir=str(scratch),
        callbacks=[timer, DataStatsLogger()],
    )
    trainer.fit(task, datamodule=datamodule)
    if not timer.marks.done:
        raise RuntimeError(f"ours stopped after {trainer.global_step} steps, before step {args.steps}: too few samples")
    timed = args.steps - args.warmup
    result = figures(timer.marks.result(), timed, args.batch_size, 1000 * statistics.fmean(timer.gaps))
    if profiler is not None:
        import pstats

        print(f"\nprofile of ours, main process, {timed} timed steps ({timer.marks.result()['seconds']:.2f} s):")
        for order in ("tottime", "cumulative"):
            pstats.Stats(profiler).sort_stats(order).print_stats(30)
    return result


def run_ours(args: argparse.Namespace, urls: str, scratch: Path) -> dict:
    """Ours in a fresh process (like open_clip's side), with the same thread settings."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--urls", urls, "--scratch", str(scratch)]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in CHILD_OPTIONS]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(args.threads))
    results = [line[len(RESULT) :] for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"ours failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(results[-1])


# -- open_clip ---------------------------------------------------------------------------------


def run_open_clip(args: argparse.Namespace, urls: str, scratch: Path, run: int) -> dict:
    """``open_clip_train.main`` in its own environment, timed at its per-step log lines."""
    name, config = model_config(args.model_config, args.image_size)
    config_path = scratch / f"{name}.json"
    if config is not None:
        config_path.write_text(json.dumps(config))
    lr, weight_decay, eps = (str(OPTIMIZER[k]) for k in ("lr", "weight_decay", "eps"))
    beta1, beta2 = (str(beta) for beta in OPTIMIZER["betas"])
    argv = [
        *("--train-data", urls, "--dataset-type", "webdataset"),
        *("--train-num-samples", str(args.steps * args.batch_size)),
        *("--batch-size", str(args.batch_size), "--workers", str(args.workers)),
        *("--precision", args.precision, "--device", args.device, "--model", name, "--epochs", "1"),
        *("--warmup", str(LR_WARMUP), "--lr", lr, "--wd", weight_decay),
        *("--beta1", beta1, "--beta2", beta2, "--eps", eps),
        *("--local-loss", "--gather-with-grad", "--seed", "0"),
        *("--log-every-n-steps", "1", "--report-to", "", "--save-frequency", "0", "--zeroshot-frequency", "0"),
        # "none": no checkpoint at the end; its log folder goes under cwd (the scratch folder)
        *("--logs", "none", "--name", f"open_clip-{run}-{time.time_ns()}"),
    ]
    bench_dir = str(Path(__file__).resolve().parent)
    registered = str(config_path) if config is not None else ""
    command = [args.open_clip_python, "-c", OPEN_CLIP_DRIVER, bench_dir, registered, str(args.threads)]
    command += [str(args.warmup), str(args.steps), *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(args.threads), cwd=scratch)
    output = done.stdout + done.stderr
    results = [line[len(RESULT) :] for line in done.stdout.splitlines() if line.startswith(RESULT)]
    marks = json.loads(results[-1]) if results else {}
    if done.returncode != 0 or not marks:
        raise RuntimeError(f"open_clip failed (exit {done.returncode}):\n{output[-4000:]}")
    lines = [m.groupdict() for m in OPEN_CLIP_LINE.finditer(output)]
    data_ms = 1000 * statistics.fmean(float(line["data"]) for line in lines[args.warmup : args.steps])
    return figures(marks, args.steps - args.warmup, args.batch_size, data_ms)


# -- main --------------------------------------------------------------------------------------

CHILD_OPTIONS = (
    "steps",
    "warmup",
    "batch_size",
    "workers",
    "image_size",
    "threads",
    "precision",
    "device",
    "model_config",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=8, help="first steps not timed (at least 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data loader worker processes (both sides)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--image-size", type=int, default=64, help="model input size (data.image_size)")
    parser.add_argument("--source-size", type=int, default=None, help="side of the shard images (default: image size)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each training process")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="open_clip's name for it")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model-config", type=Path, default=DEFAULT_MODEL_CONFIG, help="a configs/model/clip file")
    parser.add_argument("--shard-dir", type=Path, default=None, help="write the shards here and reuse them next time")
    parser.add_argument("--open-clip-python", default=DEFAULT_OPEN_CLIP_PYTHON, help="Python of open_clip's env")
    parser.add_argument("--ours-only", action="store_true", help="skip open_clip")
    parser.add_argument("--profile", action="store_true", help="run ours once with cProfile on the timed steps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")
    if args.repeats < 1 or args.batch_size < 1 or args.workers < 0 or args.threads < 1:
        parser.error("need --repeats, --batch-size, --threads >= 1 and --workers >= 0")
    return args


def row(label: str, result: dict, ratio: float | None = None) -> str:
    text = (
        f"{label:<10} {result['samples_per_s']:>10.1f} {result['cpu_ms_per_sample']:>11.2f} "
        f"{result['worker_cpu_ms_per_sample']:>9.2f} {result['cores']:>6.2f} {result['wait_ms']:>8.1f}"
    )
    return text + (f" {ratio:>8.3f}" if ratio is not None else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(train_ours(args, args.urls, args.scratch)), flush=True)
        return 0

    versions = None if args.ours_only or args.profile else open_clip_versions(args.open_clip_python)
    if versions is None and not (args.ours_only or args.profile):
        print(OPEN_CLIP_SETUP.format(python=args.open_clip_python))
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        scratch = Path(tmp)
        shard_dir = args.shard_dir or scratch / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        # each reader (data worker) of either side reads its own shards: enough for its share of the
        # steps, plus one batch that ours drops at the end of its shards (drop_last) and one of slack
        readers = max(1, args.workers)
        shards = readers * math.ceil(SHARDS / readers)
        samples = readers * (math.ceil(args.steps / readers) + 2) * args.batch_size
        urls = ensure_shards(shard_dir, samples, args.source_size or args.image_size, shards)
        name, _ = model_config(args.model_config, args.image_size)

        import open_clip
        import pytorch_lightning
        import torch
        import webdataset

        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load average {load_average()}")
        print(
            f"ours: torch {torch.__version__}, open_clip {open_clip.__version__}, webdataset {webdataset.__version__}, "
            f"lightning {pytorch_lightning.__version__}"
        )
        if versions:
            listed = ", ".join(f"{k} {v}" for k, v in versions.items())
            print(f"open_clip_train env ({args.open_clip_python}): {listed}")
        print(
            f"settings: model {name} ({args.model_config.name}, {args.image_size} px), batch {args.batch_size}, "
            f"{args.precision}, device {args.device}, {args.workers} workers, {args.threads} threads, "
            f"{args.steps} steps of which the first {args.warmup} untimed, shards {urls}"
        )
        if args.profile:
            result = train_ours(args, urls, scratch)
            print(f"ours: {result['samples_per_s']:.1f} samples/s (under cProfile)")
            return 0

        header = (
            f"{'run':<10} {'samples/s':>10} {'CPU ms/smp':>11} {'(workers)':>9} {'cores':>6} {'wait ms':>8} "
            f"{'ours/oc':>8}"
        )
        print("CPU ms/smp: CPU time of the training process and its data workers per sample (workers: theirs)")
        print("wait ms: ours, gap between steps (data wait + Lightning); open_clip, its Data (t)")
        print(header)
        print("-" * len(header))
        ours: list[dict] = []
        theirs: list[dict] = []
        for run in range(1, args.repeats + 1):
            order = ("ours", "open_clip") if run % 2 == 1 else ("open_clip", "ours")
            results = {}
            for which in order:
                if which == "ours":
                    results[which] = run_ours(args, urls, scratch)
                elif versions is not None:
                    results[which] = run_open_clip(args, urls, scratch, run)
                if which in results:
                    print(row(f"{run} {which[:9]}", results[which]) + f"   load {load_average()}", flush=True)
            ours.append(results["ours"])
            if "open_clip" in results:
                theirs.append(results["open_clip"])
                ratio = results["ours"]["samples_per_s"] / results["open_clip"]["samples_per_s"]
                print(f"{'':<10} {'':>10} {'':>11} {'':>9} {'':>6} {'':>8} {ratio:>8.3f}")
        print("-" * len(header))

        def medians(results: list[dict]) -> dict:
            return {key: statistics.median(r[key] for r in results) for key in results[0]}

        median_ours = medians(ours)
        print(row("ours", median_ours) + "   median")
        if not theirs:
            print(f"load average after: {load_average()} (no open_clip comparison)")
            return 0
        median_theirs = medians(theirs)
        ratio = median_ours["samples_per_s"] / median_theirs["samples_per_s"]
        cpu_ratio = median_theirs["cpu_ms_per_sample"] / median_ours["cpu_ms_per_sample"]
        print(row("open_clip", median_theirs, ratio) + "   median")
        print(f"load average after: {load_average()}")
        print(f"CPU work per sample, open_clip / ours = {cpu_ratio:.3f} (above 1: ours does less work per sample)")
        verdict = "PASS" if ratio >= TARGET else "FAIL (ours is slower than open_clip's training loop)"
        print(f"throughput ours / open_clip = {ratio:.3f} (target >= {TARGET:.1f}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
