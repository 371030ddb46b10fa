"""LoRA through peft: only adapters train, merged equals applied at runtime, weight 0 is the base, several adapters
combine, adapter files round-trip, mismatches fail clearly, and the merge, sample and benchmark tools run."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, write_shards
from tiny import AE, CLIP, UNET
from trainer.checkpoints import export_vae, save_safetensors
from trainer.datamodule import ShardDataModule
from trainer.errors import ConfigError
from trainer.lora import (
    LoraSpec,
    adapter_parameters,
    adapter_state_dict,
    apply_lora,
    load_adapters,
    merge_adapters,
    merge_into_state_dict,
    parse_adapter_arg,
    parse_lora_config,
    read_adapters,
    save_adapters,
)
from trainer.models.autoencoder import AutoencoderKL
from trainer.models.clip import build_clip, export_clip
from trainer.models.text_encoder import TextEncoder
from trainer.models.unet import UNetModel
from trainer.tasks.latent_diffusion import LatentDiffusionTask

LORA = {
    "rank": 4,
    "alpha": 8,
    "dropout": 0.1,
    "targets": ["attention", "ff"],
    "text_encoder": {"rank": 2, "alpha": 2, "targets": ["attention", "mlp"]},
}
VALIDATION = {"prompts": ["a red circle"], "steps": 2, "height": 16, "width": 16, "loss_buckets": 2}


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins for stages 1 and 2 (a CLIP export folder, an autoencoder export) and a few shards."""
    folder = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    clip, _ = build_clip("lora-test-clip", CLIP)
    export_clip(clip, "lora-test-clip", CLIP, folder / "clip")
    export_vae(AutoencoderKL.from_config(AE), folder / "vae.safetensors", scale_factor=0.5, config=AE)
    write_shards(folder / "shards", "train", 16, 8, size=32)
    write_shards(folder / "shards", "val", 8, 4, size=32, seed=1)
    # "released" UNet weights to fine-tune: a fresh UNet's zero-initialised layers (out.2, proj_out) would stop every
    # gradient from reaching the frozen-around adapters, as they never do in a trained model
    unet = nonzero(UNetModel(**UNET))
    save_safetensors({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}, folder / "sd.safetensors")
    return folder


def nonzero(model: torch.nn.Module) -> torch.nn.Module:
    """Small random values in the all-zero tensors of a freshly built model."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.05)
    return model


def make_task(stages: Path, **kwargs) -> LatentDiffusionTask:
    kwargs.setdefault("validation", VALIDATION)
    kwargs.setdefault("ema_decay", 0.9)
    kwargs.setdefault("optimizer", {"lr": 1e-2})
    return LatentDiffusionTask(
        UNET, {"checkpoint": str(stages / "vae.safetensors")}, {"source": str(stages / "clip")}, **kwargs
    )


def fit(task: LatentDiffusionTask, stages: Path, root: Path, steps: int, ckpt_path: str | None = None) -> pl.Trainer:
    data = ShardDataModule(
        train={"urls": str(stages / "shards" / "train.manifest.json")},
        val={"urls": str(stages / "shards" / "val.manifest.json")},
        batch_size=4,
        num_workers=0,
        image_size=16,  # 8 x 8 latents: small and quick
        normalize="symmetric",
    )
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
    )
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def base_state(task: LatentDiffusionTask) -> dict[str, torch.Tensor]:
    """Every parameter of the task (the EMA's included) that is not an adapter weight, cloned."""
    return {k: v.clone() for k, v in task.named_parameters(remove_duplicate=False) if ".lora_" not in k}


@pytest.fixture(scope="module")
def lora_run(stages: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three optimizer steps of a LoRA run (UNet and text-encoder adapters, EMA), a validation at step 2."""
    root = tmp_path_factory.mktemp("lora_run")
    torch.manual_seed(0)
    task = make_task(stages, lora=LORA, pretrained=str(stages / "sd.safetensors"))
    before = base_state(task)
    adapters_before = {k: v.clone() for k, v in adapter_parameters(task.unet).items()}
    adapters_before.update({f"te.{k}": v.clone() for k, v in adapter_parameters(task.text_encoder).items()})
    trainer = fit(task, stages, root, steps=3)
    return {"task": task, "trainer": trainer, "root": root, "before": before, "adapters_before": adapters_before}


def test_only_the_adapters_change_during_training(lora_run: dict) -> None:
    task, before = lora_run["task"], lora_run["before"]
    after = base_state(task)
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # UNet base, text encoder, autoencoder, EMA's frozen part: bitwise the same
    adapters = {
        **adapter_parameters(task.unet),
        **{f"te.{k}": v for k, v in adapter_parameters(task.text_encoder).items()},
    }
    assert set(adapters) == set(lora_run["adapters_before"]) and len(adapters) > 0
    unchanged = [k for k, v in adapters.items() if torch.equal(v, lora_run["adapters_before"][k])]
    assert unchanged == []  # every adapter weight of UNet and text encoder trained
    optimizer = lora_run["trainer"].optimizers[0]
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in adapters.values()}
    # the EMA averages the adapters and shares the frozen base with the UNet (one copy in memory)
    ema = task.ema_unet.module
    unet_params = dict(task.unet.named_parameters())
    for name, parameter in ema.named_parameters():
        shared = parameter.data_ptr() == unet_params[name].data_ptr()
        assert shared == (".lora_" not in name), name
    assert any(not torch.equal(p, unet_params[n]) for n, p in ema.named_parameters() if ".lora_" in n)


def test_a_lora_run_exports_its_adapters_only(lora_run: dict) -> None:
    task, export = lora_run["task"], lora_run["root"] / "export"
    assert (export / "lora.safetensors").is_file() and not (export / "ldm.safetensors").exists()
    adapters = read_adapters(export / "lora.safetensors")
    assert adapters.specs == parse_lora_config(LORA)
    expected_unet = adapter_state_dict(task.ema_unet.module)  # the EMA's adapters
    assert adapters.tensors["unet"].keys() == expected_unet.keys()
    assert all(torch.equal(adapters.tensors["unet"][k], v) for k, v in expected_unet.items())
    expected_text = adapter_state_dict(task.text_encoder)
    assert all(torch.equal(adapters.tensors["text_encoder"][k], v) for k, v in expected_text.items())
    assert adapters.metadata["objective"] == "eps"


def test_a_lora_checkpoint_resumes(lora_run: dict, stages: Path, tmp_path: Path) -> None:
    checkpoint = next((lora_run["root"] / "checkpoints").glob("*.ckpt"))  # saved after the validation at step 2
    task = make_task(stages, lora=LORA)  # random base: the checkpoint brings the fine-tuned model's
    trainer = fit(task, stages, tmp_path, steps=4, ckpt_path=str(checkpoint))
    assert trainer.global_step == 4
    before = lora_run["before"]
    after = base_state(task)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base came back from the checkpoint, untouched


@pytest.fixture(scope="module")
def models() -> dict:
    """A tiny UNet and text encoder with nonzero weights everywhere, and inputs for both."""
    torch.manual_seed(1)
    unet = nonzero(UNetModel(**UNET)).eval()  # zero-initialised layers would hide the adapters' effect
    clip, tokenizer = build_clip("lora-test-clip", CLIP)
    encoder = TextEncoder(clip, tokenizer)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 64))
    tokens = tokenizer(["a red circle", "a cat"])
    return {"unet": unet, "text_encoder": encoder, "clip": clip, "inputs": inputs, "tokens": tokens}


def trained_adapter(model: torch.nn.Module, spec: LoraSpec, kind: str, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with an adapter whose weights are random (as if trained)."""
    adapted = apply_lora(copy.deepcopy(model), spec, kind)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_parameters(adapted).values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return adapted


@pytest.fixture(scope="module")
def adapter_files(models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two adapter files: ``a`` on UNet attention + ff and text encoder attention + mlp, ``b`` on cross-attention."""
    folder = tmp_path_factory.mktemp("adapters")
    spec_a, spec_text = LoraSpec(4, 8.0, 0.0, ("attention", "ff")), LoraSpec(2, 2.0, 0.0, ("attention", "mlp"))
    unet_a = trained_adapter(models["unet"], spec_a, "unet", seed=0)
    text_a = trained_adapter(models["text_encoder"], spec_text, "text_encoder", seed=1)
    save_adapters(folder / "a.safetensors", {"unet": (unet_a, spec_a), "text_encoder": (text_a, spec_text)})
    spec_b = LoraSpec(2, 2.0, 0.0, ("cross_attention",))
    unet_b = trained_adapter(models["unet"], spec_b, "unet", seed=2)
    save_adapters(folder / "b.safetensors", {"unet": (unet_b, spec_b)})
    return {"a": folder / "a.safetensors", "b": folder / "b.safetensors", "unet_a": unet_a, "text_a": text_a}


def loaded(models: dict, adapters: list[tuple[Path, float]]) -> tuple[torch.nn.Module, torch.nn.Module]:
    unet, encoder = copy.deepcopy(models["unet"]), copy.deepcopy(models["text_encoder"])
    load_adapters({"unet": unet, "text_encoder": encoder}, adapters)
    return unet, encoder


@torch.no_grad()
def test_adapter_files_round_trip(models: dict, adapter_files: dict) -> None:
    adapters = read_adapters(adapter_files["a"])
    assert adapters.specs == {
        "unet": LoraSpec(4, 8.0, 0.0, ("attention", "ff")),
        "text_encoder": LoraSpec(2, 2.0, 0.0, ("attention", "mlp")),
    }
    with safe_open(str(adapter_files["a"]), "pt") as handle:
        keys = list(handle.keys())
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    assert all(".lora_A." in key or ".lora_B." in key for key in keys)
    # loaded at weight 1, the adapters act exactly as the ones that were saved
    unet, encoder = loaded(models, [(adapter_files["a"], 1.0)])
    assert torch.equal(unet(*models["inputs"]), adapter_files["unet_a"](*models["inputs"]))
    assert torch.equal(encoder(models["tokens"]), adapter_files["text_a"](models["tokens"]))
    assert not any(p.requires_grad for p in unet.parameters())
    assert parse_adapter_arg("x/style.safetensors:0.8") == ("x/style.safetensors", 0.8)
    assert parse_adapter_arg("style.safetensors") == ("style.safetensors", 1.0)


@torch.no_grad()
def test_weight_zero_is_the_base_and_merging_equals_runtime(models: dict, adapter_files: dict) -> None:
    base_out = models["unet"](*models["inputs"])
    base_text = models["text_encoder"](models["tokens"])
    unet, encoder = loaded(models, [(adapter_files["a"], 0.0)])
    assert torch.equal(unet(*models["inputs"]), base_out)
    assert torch.equal(encoder(models["tokens"]), base_text)

    unet, encoder = loaded(models, [(adapter_files["a"], 0.7)])
    runtime, runtime_text = unet(*models["inputs"]), encoder(models["tokens"])
    assert (runtime - base_out).abs().max() > 1e-2 and (runtime_text - base_text).abs().max() > 1e-2
    merged, merged_text = merge_adapters(unet), merge_adapters(encoder)
    assert merged.state_dict().keys() == models["unet"].state_dict().keys()  # the original layout again
    assert merged_text.state_dict().keys() == models["text_encoder"].state_dict().keys()
    torch.testing.assert_close(merged(*models["inputs"]), runtime, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_text(models["tokens"]), runtime_text, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_two_adapters_combine_with_their_weights(models: dict, adapter_files: dict) -> None:
    unet, _ = loaded(models, [(adapter_files["a"], 0.8), (adapter_files["b"], 0.5)])
    both = unet(*models["inputs"])
    alone = [
        loaded(models, [(adapter_files[name], weight)])[0](*models["inputs"])
        for name, weight in (("a", 0.8), ("b", 0.5))
    ]
    assert all((both - out).abs().max() > 1e-3 for out in alone)
    torch.testing.assert_close(merge_adapters(unet)(*models["inputs"]), both, atol=1e-5, rtol=1e-5)
    # in the weights, the deltas add up: merged(a 0.8, b 0.5) - base = 0.8 delta(a) + 0.5 delta(b)
    base = models["unet"].state_dict()
    files = {name: read_adapters(adapter_files[name]) for name in ("a", "b")}
    both_state = merge_into_state_dict(base, [(files["a"], 0.8), (files["b"], 0.5)], "unet", "base")
    delta = {name: merge_into_state_dict(base, [(files[name], 1.0)], "unet", "base") for name in ("a", "b")}
    for key, value in base.items():
        expected = value + 0.8 * (delta["a"][key] - value) + 0.5 * (delta["b"][key] - value)
        torch.testing.assert_close(both_state[key], expected, atol=1e-6, rtol=1e-5)
    changed = [key for key in base if not torch.equal(both_state[key], base[key])]
    assert changed and all(".attn" in key or ".ff." in key for key in changed)


def test_mismatches_fail_clearly(models: dict, adapter_files: dict, tmp_path: Path) -> None:
    wider = UNetModel(**{**UNET, "model_channels": 64})
    with pytest.raises(ConfigError, match=r"a\.safetensors does not fit this unet: .* [1-9]\d* shape mismatches"):
        load_adapters({"unet": wider, "text_encoder": copy.deepcopy(models["text_encoder"])}, [(adapter_files["a"], 1)])
    deeper = UNetModel(**{**UNET, "attention_resolutions": [1, 2]})  # attention at a level the adapter never saw
    with pytest.raises(ConfigError, match=r"[1-9]\d* targeted modules without weights in the file"):
        load_adapters({"unet": deeper}, [(adapter_files["b"], 1)])
    with pytest.raises(ConfigError, match=r"a\.safetensors has text_encoder adapters, but no text_encoder was given"):
        load_adapters({"unet": copy.deepcopy(models["unet"])}, [(adapter_files["a"], 1)])
    unet = copy.deepcopy(models["unet"])
    with pytest.raises(ConfigError, match=r"target 'to_qq' matches no module of the unet"):
        apply_lora(unet, LoraSpec(targets=("to_qq",)), "unet")
    with pytest.raises(ConfigError, match=r"not Linear or Conv2d"):
        apply_lora(unet, LoraSpec(targets=(r".*\.norm1",)), "unet")
    with pytest.raises(ConfigError, match=r"neither a short name of the unet .* nor a valid regular expression"):
        LoraSpec.from_config({"targets": ["attn["]}, "unet", "task.lora")
    with pytest.raises(ConfigError, match=r"task.lora has unknown keys \['ranks'\]"):
        parse_lora_config({"ranks": 4})
    with pytest.raises(ConfigError, match=r"takes no dropout"):
        parse_lora_config({"rank": 4, "text_encoder": {"dropout": 0.1}})
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match=r"plain\.safetensors is not a LoRA adapter file of ours"):
        read_adapters(tmp_path / "plain.safetensors")
    narrow = {k: v for k, v in models["unet"].state_dict().items() if ".attn2.to_k." not in k}
    with pytest.raises(ConfigError, match=r"the base has no weights for the adapted module .*attn2\.to_k"):
        merge_into_state_dict(narrow, [(read_adapters(adapter_files["b"]), 1.0)], "unet", "the base")


def test_a_task_with_a_bad_target_fails_at_construction(stages: Path) -> None:
    with pytest.raises(ConfigError, match=r"task.lora: LoRA target 'nope' matches no module of the unet"):
        make_task(stages, lora={"rank": 2, "targets": ["nope"]})


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_tool(models: dict, adapter_files: dict, stages: Path, tmp_path: Path, capsys) -> None:
    merge = load_tool("merge_lora")
    base = tmp_path / "ldm.safetensors"  # an LDM export: UNet + VAE in the SD layout, scale factor in the metadata
    tensors = {f"model.diffusion_model.{k}": v for k, v in models["unet"].state_dict().items()}
    tensors["first_stage_model.decoder.conv_out.bias"] = torch.arange(3.0)
    save_safetensors(tensors, base, {"format": "pt", "scale_factor": "0.5"})
    out, clip_out = tmp_path / "merged.safetensors", tmp_path / "merged_clip"
    argv = [str(base), f"{adapter_files['a']}:0.8", f"{adapter_files['b']}:0.5", "--out", str(out)]
    assert merge.main(argv) == 2  # adapter a also adapts the text encoder: the tool asks where its CLIP is
    assert "--text-encoder" in capsys.readouterr().err
    assert merge.main([str(base), f"{adapter_files['b']}:0.5", "--out", str(tmp_path / "b.safetensors")]) == 0

    export_clip(models["clip"], "lora-test-clip", CLIP, tmp_path / "clip")  # the CLIP the adapters were made on
    argv += ["--text-encoder", str(tmp_path / "clip"), "--text-encoder-out", str(clip_out)]
    assert merge.main(argv) == 0

    runtime_unet, runtime_text = loaded(models, [(adapter_files["a"], 0.8), (adapter_files["b"], 0.5)])
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    assert metadata["scale_factor"] == "0.5" and len(json.loads(metadata["merged_lora"])) == 2
    assert torch.equal(state["first_stage_model.decoder.conv_out.bias"], torch.arange(3.0))
    unet = UNetModel(**UNET).eval()
    unet.load_state_dict({k[len("model.diffusion_model.") :]: v for k, v in state.items() if k.startswith("model.")})
    encoder = TextEncoder.from_source(str(clip_out))
    with torch.no_grad():
        torch.testing.assert_close(unet(*models["inputs"]), runtime_unet(*models["inputs"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoder(models["tokens"]), runtime_text(models["tokens"]), atol=1e-5, rtol=1e-5)


def test_merge_tool_from_a_lora_runs_checkpoint(lora_run: dict, tmp_path: Path) -> None:
    """The run's base (from its .ckpt) + its exported adapters = the run's EMA UNet with its adapters."""
    merge = load_tool("merge_lora")
    checkpoint = next((lora_run["root"] / "checkpoints").glob("*.ckpt"))
    out = tmp_path / "merged.safetensors"
    adapters = lora_run["root"] / "export" / "lora.safetensors"
    assert merge.main([str(checkpoint), str(adapters), "--out", str(out), "--skip-text-encoder"]) == 0
    task = lora_run["task"]
    with safe_open(str(out), "pt") as handle:
        assert float(handle.metadata()["scale_factor"]) == 0.5
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    unet = UNetModel(**UNET).eval()
    unet.load_state_dict({k[len("model.diffusion_model.") :]: v for k, v in state.items() if k.startswith("model.")})
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([5, 900]), torch.randn(2, 16, 64))
    with torch.no_grad():
        expected = task.ema_unet.module.eval()(*inputs)
        torch.testing.assert_close(unet(*inputs), expected, atol=1e-5, rtol=1e-5)
    # the task's own SD-layout export of a LoRA run is the same merged model
    with safe_open(str(task.export(tmp_path / "export.safetensors")), "pt") as handle:
        assert set(handle.keys()) == set(state)
        for key in state:
            torch.testing.assert_close(handle.get_tensor(key), state[key], atol=1e-6, rtol=1e-6)
    assert adapter_parameters(task.ema_unet.module)  # exporting merged a copy; the task keeps its adapters


@pytest.mark.slow
def test_sample_tool_with_lora(lora_run: dict, tmp_path: Path, capsys) -> None:
    sample = load_tool("sample")
    checkpoint = next((lora_run["root"] / "checkpoints").glob("*.ckpt"))
    adapters = lora_run["root"] / "export" / "lora.safetensors"
    common = [str(checkpoint), "--prompt", "a red circle", "--steps", "2", "--device", "cpu"]
    assert sample.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert sample.main([*common, "--lora", f"{adapters}:0", "--out", str(tmp_path / "zero")]) == 0
    assert (
        sample.main([*common, "--lora", f"{adapters}:0.8", "--lora", f"{adapters}:0.5", "--out", str(tmp_path / "two")])
        == 0
    )
    plain = (tmp_path / "plain" / "0000.png").read_bytes()
    assert (tmp_path / "zero" / "0000.png").read_bytes() == plain  # weight 0: the checkpoint's own images
    assert (tmp_path / "two" / "grid.png").is_file()
    # an adapter made for another model fails with one line naming it, no traceback
    spec = LoraSpec(2, 2.0, 0.0, ("attention",))
    wide = apply_lora(UNetModel(**{**UNET, "model_channels": 64}), spec, "unet")
    save_adapters(tmp_path / "wide.safetensors", {"unet": (wide, spec)})
    assert sample.main([*common, "--lora", str(tmp_path / "wide.safetensors"), "--out", str(tmp_path / "bad")]) == 2
    assert "wide.safetensors does not fit this unet" in capsys.readouterr().err


def test_the_readme_lora_overrides_compose_and_build(stages: Path, tmp_path: Path) -> None:
    """The README's LoRA commands as Hydra overrides: they compose, and the shapes one builds a LoRA task."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from trainer.train import CONFIG_DIR

    pretrained = tmp_path / "ldm.safetensors"  # stands in for outputs/shapes_ldm/latest/export/ldm.safetensors
    overrides = [
        "experiment=shapes_ldm",
        "name=shapes_ldm_lora",
        "task.lora={rank: 8, alpha: 8, targets: [attention, ff]}",
        f"task.pretrained={pretrained}",
        # the stand-ins for the earlier stages (the test CLIP is 64 wide)
        f"task.autoencoder.checkpoint={stages / 'vae.safetensors'}",
        f"task.text_encoder.source={stages / 'clip'}",
        "model.context_dim=64",
        f"paths.output_dir={tmp_path}",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        sd15 = compose("train", overrides=["experiment=finetune_sd15_lora", f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    base = nonzero(UNetModel.from_config(dict(cfg.model)))
    save_safetensors({f"model.diffusion_model.{k}": v for k, v in base.state_dict().items()}, pretrained)
    task = instantiate(cfg.task)
    assert cfg.name == "shapes_ldm_lora"
    assert task.lora_specs == {"unet": LoraSpec(8, 8.0, 0.0, ("attention", "ff"))}
    trainable = {name for name, p in task.named_parameters() if p.requires_grad and not name.startswith("ema_unet.")}
    assert trainable and all(".lora_" in name for name in trainable)
    loaded_base = {k.replace(".base_layer", ""): v for k, v in task.unet.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(loaded_base[k], v) for k, v in base.state_dict().items())
    specs = parse_lora_config(sd15.task.lora)
    assert specs["unet"].targets == ("attention", "ff") and specs["text_encoder"].rank == 8
    assert sd15.task.optimizer.lr == 1.0e-4
    # scaled down to two steps on the test shards (no validation: the shapes grid samples 4 prompts x 20 steps)
    data = ShardDataModule(
        train={"urls": str(stages / "shards" / "train.manifest.json")},
        batch_size=2,
        num_workers=0,
        image_size=16,
        normalize="symmetric",
    )
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path / "run",
    )
    trainer.fit(task, datamodule=data)
    assert read_adapters(tmp_path / "run" / "export" / "lora.safetensors").specs == task.lora_specs
    after = {k.replace(".base_layer", ""): v for k, v in task.unet.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.state_dict().items())


@pytest.mark.slow
def test_lora_benchmark_runs(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_lora", REPO / "tools" / "bench" / "lora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--model-channels", "32", "--latent-size", "8", "--batch", "1", "--context-tokens", "4"]
    assert bench.main([*argv, "--steps", "1", "--warmup", "0", "--threads", "1"]) == 0
    output = capsys.readouterr().out
    assert "full " in output and "lora " in output and "of the trainable parameters" in output
