"""Stage 1, CLIP: optimizer groups, schedule, metrics, weights in and out, distributed loss."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from trainer.errors import ConfigError
from trainer.models.clip import build_clip, export_clip, export_clip_checkpoint, load_clip_weights
from trainer.tasks.clip import CLIPTask, make_loss, no_weight_decay, retrieval_recall
from trainer.tasks.optimization import warmup_cosine

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MODEL = {"name": "clip-test-tiny", "config": TINY, "pretrained": None}


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    return build_clip(MODEL["name"], TINY)


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    _, tokenizer = tiny_clip()
    tokens = tokenizer([f"caption number {i} of {n}" for i in range(n)])
    return images, tokens


def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale() -> None:
    model, _ = tiny_clip()
    excluded = {name for name, p in model.named_parameters() if no_weight_decay(name, p)}
    decayed = {name for name, p in model.named_parameters()} - excluded
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding"} <= excluded
    assert {"ln_final.weight", "ln_final.bias", "visual.ln_pre.weight"} <= excluded
    assert all(p.ndim >= 2 for name, p in model.named_parameters() if name in decayed)
    assert "visual.conv1.weight" in decayed and "transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert not any("bias" in name or "ln_" in name for name in decayed)


def test_warmup_then_cosine_closed_form() -> None:
    factor = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)


def test_retrieval_recall_against_a_direct_count() -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(50, 8), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(50, 8), dim=1)
    metrics = retrieval_recall(image, text, (1, 5))
    similarity = image @ text.T
    for k in (1, 5):
        direct = sum(i in similarity[i].topk(k).indices.tolist() for i in range(50)) / 50
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(direct)
        direct_t = sum(i in similarity[:, i].topk(k).indices.tolist() for i in range(50)) / 50
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(direct_t)
    assert retrieval_recall(image, image, (1,))["image_to_text_R@1"] == 1.0


def test_export_loads_in_open_clip_with_identical_embeddings(tmp_path: Path) -> None:
    model, _ = tiny_clip(seed=3)
    model.eval()
    out = export_clip(model, MODEL["name"], TINY, tmp_path / "export")
    loaded = open_clip.create_model(f"local-dir:{out}").eval()
    images, tokens = inputs(4)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_export_from_a_lightning_checkpoint(tmp_path: Path) -> None:
    task = CLIPTask(MODEL)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    out = export_clip_checkpoint(tmp_path / "last.ckpt", tmp_path / "export")
    loaded = open_clip.create_model(f"local-dir:{out}").eval()
    images, _ = inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), task.model.eval().encode_image(images))


def test_pretrained_weights_load_from_open_clip_files_and_our_checkpoints(tmp_path: Path) -> None:
    source, _ = tiny_clip(seed=1)
    torch.save(source.state_dict(), tmp_path / "open_clip_format.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ours.ckpt")
    for name in ("open_clip_format.pt", "ours.ckpt"):
        target, _ = tiny_clip(seed=2)
        load_clip_weights(target, tmp_path / name)
        assert all(
            torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values(), strict=True)
        )


def test_mismatched_weights_fail_with_the_keys_listed(tmp_path: Path) -> None:
    source, _ = tiny_clip()
    state = source.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "bad.pt")
    target, _ = tiny_clip()
    with pytest.raises(ConfigError, match=r"missing keys \['ln_final.bias'\].*unexpected keys \['extra.weight'\]"):
        load_clip_weights(target, tmp_path / "bad.pt")


def test_locking_freezes_a_tower_and_the_logit_scale_is_clamped() -> None:
    task = CLIPTask(MODEL, lock_image=True)
    assert not any(p.requires_grad for p in task.model.visual.parameters())
    assert task.model.token_embedding.weight.requires_grad
    task.model.logit_scale.data.fill_(10.0)
    task.on_train_batch_end(None, None, 0)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100))


def test_siglip_loss_option_trains_a_step() -> None:
    task = CLIPTask(MODEL, loss="siglip")
    task.loss_fn = make_loss("siglip", local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    images, tokens = inputs(4)
    loss, out = task.contrastive_loss(images, tokens)
    loss.backward()
    assert torch.isfinite(loss) and "logit_bias" in out and task.model.logit_bias.grad is not None


# -- distributed correctness: 2 processes with gather_with_grad == 1 process on the whole batch ---


def _ddp_rank(rank: int, port: int, images, tokens, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, _ = tiny_clip(seed=0)
        ddp = DistributedDataParallel(model)
        loss_fn = make_loss("clip", local_loss=True, gather_with_grad=True, rank=rank, world_size=2)
        half = len(images) // 2
        out = ddp(images[rank * half : (rank + 1) * half], tokens[rank * half : (rank + 1) * half])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()  # DDP averages the gradients over the two ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        # numpy arrays travel by value (tensors would be shared memory, gone when this process exits)
        queue.put((rank, (mean_loss / 2).item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_loss_and_gradients_equal_one_process_on_the_whole_batch() -> None:
    import torch.multiprocessing as mp

    images, tokens = inputs(8, seed=5)
    model, _ = tiny_clip(seed=0)
    out = model(images, tokens)
    reference = make_loss("clip", local_loss=False, gather_with_grad=False, rank=0, world_size=1)(
        out["image_features"], out["text_features"], out["logit_scale"]
    )
    reference.backward()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_ddp_rank, args=(r, port, images, tokens, queue)) for r in range(2)]
    for p in processes:
        p.start()
    results = dict((rank, (loss, grads)) for rank, loss, grads in (queue.get(timeout=180) for _ in processes))
    for p in processes:
        p.join(timeout=60)
    for rank in range(2):
        loss, grads = results[rank]
        assert loss == pytest.approx(reference.item(), abs=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(
                torch.from_numpy(grads[name]), param.grad, atol=1e-5, rtol=1e-4, msg=f"{name} on rank {rank}"
            )


@pytest.mark.slow
def test_a_tiny_clip_learns_the_shapes_data(tmp_path: Path) -> None:
    """~2 minutes on 2 cores: 400 steps at batch 64 on 32 px shapes, evaluated on 500 held-out images.

    Measured: image->text recall@1 0.238 (chance 0.002), text->image 0.190, zero-shot colour 0.95.
    The thresholds keep about half of that as margin.
    """
    import pytorch_lightning as pl

    from trainer.data.shapes import ensure_shapes
    from trainer.datamodule import ShardDataModule

    shapes = ensure_shapes(tmp_path / "shapes", n_train=8000, n_val=500, size=32, samples_per_shard=500)
    config = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "head_width": 32, "patch_size": 4},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    }
    torch.manual_seed(0)
    task = CLIPTask(
        {"name": "clip-learn", "config": config},
        optimizer={"lr": 1e-3, "weight_decay": 0.1},
        scheduler={"warmup_steps": 30, "total_steps": 400},
        zero_shot="shapes",
        export=False,
    )
    data = ShardDataModule(
        train={"urls": f"{shapes}/train.manifest.json"},
        val={"urls": f"{shapes}/val.manifest.json"},
        batch_size=64,
        num_workers=1,
        image_size=32,
        tokenizer=task.tokenizer,
    )
    trainer = pl.Trainer(
        max_steps=400,
        val_check_interval=None,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    trainer.validate(task, datamodule=data, verbose=False)
    metrics = trainer.callback_metrics
    assert metrics["val/samples"] == 500
    assert metrics["val/image_to_text_R@1"] > 0.12 and metrics["val/text_to_image_R@1"] > 0.09
    assert metrics["val/zero_shot_color_accuracy"] > 0.7
