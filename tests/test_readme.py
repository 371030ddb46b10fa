"""Every command in the README is run by a test: this file knows which test runs each one.

A README command that is not in :data:`COVERAGE` fails :func:`test_every_readme_command_is_covered`, with the
commands to add; each entry names the tests that run the command (as written, or scaled down: fewer steps,
tiny models, data in a temporary folder) and a fragment of it that those tests' files must contain, so an entry
cannot point at a test that does something else. Commands that only make sense on a cluster with real
weights or LAION shards are composed (every experiment is composed and run for a few steps on CPU by
``tests/test_configs.py``) and, for the SLURM scripts, run on a local two-node SLURM cluster.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
CONFIGS = "tests/test_configs.py::test_every_experiment_composes_with_debug_fast"
RESOLVES = "tests/test_configs.py::test_every_experiment_composes_and_resolves"
CI = ".ci/run"  # the README's test command, which CI runs on a fresh clone

# command (or, ending in "*", a prefix of commands) -> (tests that run it, a fragment those test files contain)
COVERAGE: dict[str, tuple[tuple[str, ...], str]] = {
    "pip install -e . && python -m trainer.demo": (
        ("tests/test_demo.py::test_the_fast_demo_runs_end_to_end_and_writes_what_it_promises",),
        "trainer.demo",
    ),
    "python -m trainer.demo --ldm-steps 5500": (
        ("tests/test_demo.py::test_the_fast_demo_runs_end_to_end_and_writes_what_it_promises",),
        "--ldm-steps",
    ),
    "pip install -e '.[test]' && python -m pytest": ((CI,), "python -m pytest"),
    "python -m trainer.train experiment=shapes_clip model.pretrained=*": (
        ("tests/test_clip.py::test_pretrained_weights_load_from_open_clip_files_and_our_checkpoints",),
        "pretrained",
    ),
    "python -m trainer.train experiment=shapes_clip trainer.devices=2 trainer.strategy=ddp": (
        ("tests/test_train_cli.py::test_two_process_ddp_on_cpu",),
        "trainer.strategy=ddp",
    ),
    "python -m trainer.train experiment=shapes_clip --cfg job": (
        ("tests/test_configs.py::test_cfg_job_prints_the_resolved_config",),
        "--cfg",
    ),
    "python -m trainer.train experiment=shapes_clip debug=fast": (
        ("tests/test_configs.py::test_every_experiment_composes_with_debug_fast",),
        "debug=fast",
    ),
    "python -m trainer.train experiment=shapes_clip logger=[csv,tensorboard]": (("here",), ""),
    "python -m trainer.train experiment=shapes_clip trainer.max_steps=2000 data.batch_size=128": (
        ("tests/test_configs.py::test_overrides_reach_the_objects",),
        "data.batch_size",
    ),
    "python -m trainer.train experiment=shapes_clip data.caption_transform=null task.positives=null": (
        ("tests/test_configs.py::test_overrides_reach_the_objects",),
        "task.positives=null",
    ),
    "python -m trainer.train experiment=shapes_clip data.caption_transform.shape=0.5": (
        ("tests/test_configs.py::test_shapes_clip_trains_on_single_attribute_captions_with_their_positives",),
        "data.caption_transform.shape=0.5",
    ),
    "python -m trainer.train experiment=laion_clip_vit_b32 'data.caption_transform=*": (
        ("tests/test_configs.py::test_shapes_clip_trains_on_single_attribute_captions_with_their_positives",),
        "experiment=laion_clip_vit_b32",
    ),
    "python -m trainer.train experiment=shapes_clip": (
        ("tests/test_train_cli.py::test_the_three_shapes_stages_chain_through_the_cli",),
        "experiment=shapes_clip",
    ),
    "python -m trainer.train experiment=shapes_autoencoder": (
        ("tests/test_train_cli.py::test_the_three_shapes_stages_chain_through_the_cli",),
        '"shapes_autoencoder"',
    ),
    "python -m trainer.train experiment=shapes_ldm": (
        ("tests/test_train_cli.py::test_the_three_shapes_stages_chain_through_the_cli",),
        '"shapes_ldm"',
    ),
    "python -m trainer.train experiment=photos_autoencoder": ((CONFIGS,), "debug=fast"),
    "python -m trainer.train experiment=laion_*": ((CONFIGS, RESOLVES), "REQUIRED"),
    "python -m trainer.train experiment=finetune_sd15*": ((CONFIGS, RESOLVES), "REQUIRED"),
    "python -m trainer.train experiment=finetune_ldm data.images=*": (
        ("tests/test_finetune_recipes.py::test_finetune_ldm_on_a_folder_from_an_ldm_export",),
        '"experiment=finetune_ldm", f"data.images={photos}"',
    ),
    "python -m trainer.train experiment=finetune_clip data.images=*": (
        ("tests/test_finetune_recipes.py::test_finetune_clip_on_a_caption_table_with_a_locked_image_tower",),
        '"data.ingest.caption_column=text",\n        "task.lock_image=true"',
    ),
    "python -m trainer.train experiment=finetune_autoencoder data.images=*": (
        ("tests/test_finetune_recipes.py::test_finetune_autoencoder_trains_the_decoder_only",),
        '"experiment=finetune_autoencoder", f"data.images={photos}"',
    ),
    "python -m trainer.train -m launcher=slurm*": (
        ("tests/test_slurm.py::test_a_sweep_is_submitted_through_the_submitit_launcher",),
        "launcher=slurm",
    ),
    "sbatch slurm/train.sbatch*": (
        ("tests/test_slurm.py::test_sigusr1_checkpoints_requeues_and_the_job_resumes",),
        "train.sbatch",
    ),
    "sbatch --nodes=8 slurm/multinode.sbatch*": (
        ("tests/test_slurm.py::test_two_node_ddp_job_matches_one_process_on_the_same_global_batch",),
        "multinode.sbatch",
    ),
    'python tools/sample.py CKPT --prompt "a green star" --init-image*': (
        ("tests/test_latent_diffusion.py::test_sampling_cli_end_to_end",),
        "--init-image",
    ),
    'python tools/sample.py outputs/shapes_ldm/latest/checkpoints/last.ckpt --prompt "a small red circle*': (
        ("tests/test_latent_diffusion.py::test_sampling_cli_end_to_end",),
        "--trajectory",
    ),
    "python tools/cache_latents.py*": (
        ("tests/test_latent_diffusion.py::test_cached_latents_train_and_a_stale_cache_is_refused",),
        "cache_latents.py",
    ),
    "python -m trainer.train experiment=shapes_ldm name=shapes_ldm_lora task.lora=*": (
        ("tests/test_lora.py::test_the_readme_lora_overrides_compose_and_build",),
        "task.lora={rank: 8, alpha: 8, targets: [attention, ff]}",
    ),
    'python tools/sample.py outputs/shapes_ldm/latest/checkpoints/last.ckpt --prompt "a large blue square in the center" --lora*': (
        ("tests/test_lora.py::test_sample_tool_with_lora",),
        '"--lora"',
    ),
    "python tools/merge_lora.py*": (
        (
            "tests/test_lora.py::test_merge_tool",
            "tests/test_lora.py::test_merge_tool_from_a_lora_runs_checkpoint",
        ),
        '"--text-encoder-out"',
    ),
    "python -m trainer.train experiment=photos_autoencoder 'data.buckets=*": (
        (
            "tests/test_buckets.py::test_the_readme_bucketed_autoencoder_run",
            "tests/test_buckets.py::test_the_readme_bucket_override_composes_and_reaches_the_pipeline",
        ),
        "data.buckets={max_area: 4096, step: 16, max_aspect: 2.0}",
    ),
    'python tools/sample.py outputs/shapes_ldm/latest/checkpoints/last.ckpt --prompt "a red circle" --width 80*': (
        ("tests/test_buckets.py::test_the_readme_sampling_command_at_a_non_square_size",),
        '"--width", "80", "--height", "48", "--steps", "10"',
    ),
    "python -m trainer.eval.shapes*": (("tests/test_eval_shapes.py::test_command_line",), "main("),
    "python -m trainer.eval.metrics samples/ --clip*": (
        ("tests/test_eval_metrics.py::test_cli_reports_clip_score_for_a_sample_folder",),
        "--clip",
    ),
    "python -m trainer.eval.metrics samples/ --real*": (
        ("tests/test_eval_metrics.py::test_fid_without_local_inception_weights_says_where_to_get_them",),
        "inception",
    ),
    "pip install -e '.[eval]'": (("here",), ""),
    "wandb login && python -m trainer.train experiment=shapes_clip logger=[wandb,csv]": (
        ("tests/test_resume.py::test_wandb_offline_writes_a_run_and_a_resumed_run_logs_into_the_same_one",),
        "logger=[csv,wandb]",
    ),  # offline: no network here; the logger and its run id are the same
    "WANDB_MODE=offline python -m trainer.train experiment=shapes_clip logger=[wandb,csv]": (
        ("tests/test_resume.py::test_wandb_offline_writes_a_run_and_a_resumed_run_logs_into_the_same_one",),
        "WANDB_MODE",
    ),
    "python -m trainer.data.shapes*": (("tests/test_shapes.py::test_command_line",), "--train"),
    "python tools/make_shards.py*": (("tests/test_tools_shards.py::test_make_shards_cli",), "make_shards"),
    "python tools/inspect_shards.py*": (("tests/test_tools_shards.py::test_inspect_cli",), "--grid"),
    "pip install -e '.[dev]'": (("here",), ""),
    "python -m pytest": ((CI,), "python -m pytest"),
    'python -m pytest -m "not slow"': ((CI,), "python -m pytest"),  # a part of what CI runs
    "ruff check . && ruff format --check .": (("here",), ""),
    "python tools/bench/*": (("here",), ""),
}


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ``bash`` blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        current = ""
        for line in block.splitlines():
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            if stripped.endswith("\\"):
                current += stripped[:-1].strip() + " "
                continue
            commands.append(re.sub(r"\s+#\s.*$", "", current + stripped).strip())
            current = ""
    return commands


def coverage_of(command: str) -> tuple[tuple[str, ...], str] | None:
    """The entry for ``command`` in :data:`COVERAGE`: the command itself, else its longest ``*`` prefix."""
    if command in COVERAGE:
        return COVERAGE[command]
    prefixes = [key for key in COVERAGE if key.endswith("*") and command.startswith(key[:-1])]
    return COVERAGE[max(prefixes, key=len)] if prefixes else None


def test_the_parser_joins_continuations_and_drops_comments() -> None:
    text = "x\n```bash\n# a comment\npython a.py --x 1 \\\n    --y 2   # what it does\n\npip install b\n```\n"
    assert readme_commands(text) == ["python a.py --x 1 --y 2", "pip install b"]


def test_every_readme_command_is_covered() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) > 20
    missing = [command for command in commands if coverage_of(command) is None]
    assert not missing, "README commands that no test runs (add them to COVERAGE):\n" + "\n".join(missing)


@pytest.mark.parametrize("prefix", sorted(COVERAGE))
def test_every_named_test_exists_and_runs_the_command(prefix: str) -> None:
    tests, fragment = COVERAGE[prefix]
    for test in tests:
        if test in ("here", CI):
            assert test == "here" or "python -m pytest" in (REPO / CI).read_text()
            continue
        path, name = test.split("::")
        source = (REPO / path).read_text()
        functions = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
        assert name in functions, f"{test} (for README command {prefix!r}) does not exist"
        assert fragment in source, f"{path} does not contain {fragment!r}: does {name} run {prefix!r}?"


def test_tensorboard_logger_writes_event_files(tmp_path: Path, shards: Path) -> None:
    """``logger=[csv,tensorboard]``: both loggers write (two steps of the tiny CLIP)."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", "experiment=shapes_clip", "debug=fast", "logger=[csv,tensorboard]"]
        + ["data.prepare=null", f"data.train.urls={shards}/train.manifest.json"]
        + [f"data.val.urls={shards}/val.manifest.json", f"hydra.run.dir={tmp_path}/run", "data.num_workers=0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")) and list((tmp_path / "run").rglob("metrics.csv"))


def test_extras_dev_tools_and_benchmarks_are_declared_and_start() -> None:
    """``pip install -e '.[eval]'`` / ``'.[dev]'`` name extras that exist; ``ruff`` is configured; every benchmark
    script the README names parses its arguments (``--help``) without running."""
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in ("test", "eval", "dev"):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), extra
    assert "[tool.ruff]" in pyproject
    for command in readme_commands(README.read_text()):
        if command.startswith("python tools/bench/"):
            script = REPO / command.split()[1]
            result = subprocess.run(
                [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
            )
            assert result.returncode == 0 and "usage" in result.stdout, (command, result.stderr[-2000:])
