"""Stage 1, CLIP: optimizer groups, schedule, metrics, weights in and out, distributed loss."""

from __future__ import annotations

import math
import random
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from trainer.errors import ConfigError
from trainer.models.clip import build_clip, export_clip, export_clip_checkpoint, load_clip_weights
from trainer.tasks.clip import (
    CLIPTask,
    MultiPositiveClipLoss,
    make_loss,
    no_weight_decay,
    positive_pairs,
    retrieval_recall,
    swapped_caption,
    swapped_captions,
    word_group_pattern,
)
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
    # right after the optimizer step, before callbacks (a checkpoint) see it
    task.optimizer_step(0, 0, torch.optim.SGD(task.parameters(), lr=0.0), lambda: None)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100))


def test_siglip_loss_option_trains_a_step() -> None:
    task = CLIPTask(MODEL, loss="siglip")
    task.loss_fn = make_loss("siglip", local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    images, tokens = inputs(4)
    loss, out = task.contrastive_loss(images, tokens)
    loss.backward()
    assert torch.isfinite(loss) and "logit_bias" in out and task.model.logit_bias.grad is not None


def test_positive_pairs_are_the_images_that_agree_with_every_attribute_a_caption_names() -> None:
    images = [
        {"shape": "circle", "color": "red"},
        {"shape": "square", "color": "red"},
        {"shape": "circle", "color": "blue"},
        {"color": "red"},  # no shape in its json
    ]
    captions = [{"shape": "circle"}, {"color": "red"}, {"shape": "circle", "color": "blue"}, {}, {"shape": "star"}]
    expected = torch.tensor(
        [
            # "circle", "red", "blue circle", names nothing (other data's caption: no image), "star"
            [True, True, False, False, False],
            [False, True, False, False, False],
            [True, False, True, False, False],
            [False, True, False, False, False],
        ]
    )
    assert torch.equal(positive_pairs(images, captions), expected)


def _soft_clip_loss_by_hand(image: torch.Tensor, text: torch.Tensor, scale: float, positives: torch.Tensor) -> float:
    """The multi-positive InfoNCE loss, one row at a time: each row's log-softmax averaged over its positives."""
    total = 0.0
    for logits, rows in ((scale * image @ text.T, positives), (scale * text @ image.T, positives.T)):
        terms = []
        for row, positive in zip(logits.tolist(), rows.tolist(), strict=True):
            norm = math.log(sum(math.exp(v) for v in row))
            chosen = [v - norm for v, p in zip(row, positive, strict=True) if p]
            terms.append(-sum(chosen) / len(chosen))
        total += sum(terms) / len(terms) / 2
    return total


def test_multi_positive_loss_is_clip_loss_with_one_positive_and_spreads_the_target_over_several() -> None:
    generator = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    scale = torch.tensor(7.0)
    loss = MultiPositiveClipLoss()
    clip = make_loss("clip", local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    identity = torch.eye(6, dtype=torch.bool)
    assert loss(image, text, scale, positives=identity).item() == pytest.approx(
        clip(image, text, scale).item(), rel=1e-6
    )
    bias = torch.tensor(-2.0)  # a model with a logit bias (SigLIP-initialized) under the InfoNCE loss
    assert loss(image, text, scale, bias, positives=identity).item() == pytest.approx(
        clip(image, text, scale, bias).item(), rel=1e-6
    )
    several = identity.clone()
    several[0, 3] = several[3, 0] = several[2, 5] = several[4, 1] = True  # not symmetric: 4 fits caption 1 only
    assert loss(image, text, scale, positives=several).item() == pytest.approx(
        _soft_clip_loss_by_hand(image, text, 7.0, several), rel=1e-5
    )


def test_positives_train_a_step_on_shapes_captions_and_bad_values_are_refused() -> None:
    from trainer.data.shapes import caption_attributes

    task = CLIPTask(MODEL, positives="trainer.data.shapes.caption_attributes")
    assert task.caption_parser is caption_attributes
    task.setup("fit")
    captions = [
        "a triangle",
        "a small red triangle in the top left",
        "a red shape",
        "a large blue circle in the center",
        "a blue shape",
    ]
    metas = [
        {"shape": "triangle", "color": "blue", "size": "small", "position": "center"},
        {"shape": "triangle", "color": "red", "size": "small", "position": "top left"},
        {"shape": "square", "color": "red", "size": "large", "position": "center"},
        {"shape": "circle", "color": "blue", "size": "large", "position": "center"},
        {"shape": "star", "color": "blue", "size": "medium", "position": "top right"},
    ]
    positives = task.batch_positives(captions, metas)
    # "a triangle" fits both triangles; "a red shape" both red figures; "a blue shape" the three blue ones, the
    # first of which has a caption that names no color; the full captions fit their own image only
    assert positives.sum(dim=0).tolist() == [2, 1, 2, 1, 3] and positives.diagonal().all()
    assert positives[:, 4].tolist() == [True, False, False, True, True]
    # a parser that returns None for what it cannot read (parse_caption, for partial captions): own image only
    strict = CLIPTask(MODEL, positives="trainer.data.shapes.parse_caption")
    assert torch.equal(strict.batch_positives(captions, metas), torch.eye(5, dtype=torch.bool))
    # captions of other data, which name nothing the parser reads, fit their own image: ClipLoss's targets
    other = task.batch_positives(["a dog", "caption number 1"], [{}, {"width": 64}])
    assert torch.equal(other, torch.eye(2, dtype=torch.bool))
    images, _ = inputs(5)
    loss, _ = task.contrastive_loss(images, task.tokenizer(captions), positives)
    loss.backward()
    assert torch.isfinite(loss) and task.model.logit_scale.grad is not None
    with pytest.raises(ConfigError, match="task.positives"):
        CLIPTask(MODEL, positives="trainer.data.shapes.no_such_function")
    with pytest.raises(ConfigError, match="loss: clip"):
        CLIPTask(MODEL, loss="siglip", positives="trainer.data.shapes.caption_attributes")


SHAPE_WORDS = [["circle", "square", "triangle", "star", "diamond"]]


def test_a_hard_negative_swaps_exactly_one_group_word_for_another() -> None:
    groups = SHAPE_WORDS + [["top left", "top", "left"]]
    pattern = word_group_pattern(groups)
    rng = random.Random(0)
    caption = "a small red Circle in the top left"
    seen = set()
    for _ in range(200):
        negative = swapped_caption(caption, pattern, groups, rng)
        seen.add(negative)
        if negative.endswith("top left"):  # the shape was swapped: for one of the four other shapes
            assert negative[: len("a small red ")] == "a small red " and negative[-16:] == " in the top left"
            assert negative[len("a small red ") : -16] in {"square", "triangle", "star", "diamond"}
        else:  # the phrase "top left" (matched whole, not as "top") became "top" or "left"
            assert negative in {"a small red Circle in the top", "a small red Circle in the left"}
    assert len(seen) == 6
    assert swapped_caption("a blue circles and stars", pattern, groups, rng) is None  # whole words only
    assert swapped_caption("an apple", pattern, groups, rng) is None


def test_hard_negative_term_is_a_two_way_softmax_of_caption_against_its_swap() -> None:
    task = CLIPTask(MODEL, hard_negatives={"word_groups": SHAPE_WORDS, "weight": 0.5})
    captions = ["a red circle", "no shape here", "a blue star"]
    images, _ = inputs(3)
    tokens = task.tokenizer(captions)
    out = task.model(images, tokens)
    loss, accuracy = task.hard_negative_loss(captions, out)
    # the same draws, by hand: the second caption has no group word and is left out
    rng = random.Random("hard-negatives/0/0")
    negatives = [swapped_caption(c, task.hard_negatives["pattern"], SHAPE_WORDS, rng) for c in captions]
    assert negatives[1] is None and negatives[0] != captions[0] and negatives[2] != captions[2]
    with torch.no_grad():
        negative = F.normalize(task.model.encode_text(task.tokenizer([negatives[0], negatives[2]])), dim=-1)
        image, text = out["image_features"][[0, 2]], out["text_features"][[0, 2]]
        scale = out["logit_scale"]
        pos, neg = scale * (image * text).sum(-1), scale * (image * negative).sum(-1)
        expected = -torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(neg))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert accuracy.item() == pytest.approx((pos > neg).float().mean().item())
    loss.backward()
    assert any(p.grad is not None for p in task.model.visual.parameters())  # both towers learn from it
    assert task.model.token_embedding.weight.grad is not None


def test_swaps_all_scores_the_caption_against_every_other_word_of_its_group() -> None:
    groups = SHAPE_WORDS + [["big", "small"]]
    pattern = word_group_pattern(groups)
    twins = swapped_captions("a big red star", pattern, groups, random.Random(3))
    assert twins in (
        ["a big red circle", "a big red square", "a big red triangle", "a big red diamond"],
        ["a small red star"],  # the word is drawn first, then every other word of its group
    )
    assert swapped_captions("an apple", pattern, groups, random.Random(0)) == []

    task = CLIPTask(MODEL, hard_negatives={"word_groups": groups, "weight": 1.0, "swaps": "all"})
    captions = ["a big red circle", "no group word", "a small star", "a blue diamond"]
    images, _ = inputs(4)
    out = task.model(images, task.tokenizer(captions))
    loss, accuracy = task.hard_negative_loss(captions, out)
    rng = random.Random("hard-negatives/0/0")  # the same draws, by hand: one softmax per caption with a group word
    losses, correct = [], []
    with torch.no_grad():
        for i, caption in enumerate(captions):
            negatives = swapped_captions(caption, task.hard_negatives["pattern"], groups, rng)
            if not negatives:
                continue
            negative = F.normalize(task.model.encode_text(task.tokenizer(negatives)), dim=-1)
            image, text = out["image_features"][i], out["text_features"][i]
            scores = out["logit_scale"] * torch.cat([(image * text).sum()[None], negative @ image])
            losses.append(-torch.log_softmax(scores, dim=0)[0])
            correct.append(bool((scores[0] > scores[1:]).all()))
    assert len(losses) == 3  # "big"/"small" have one twin, shapes four: rows of different widths
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert accuracy.item() == pytest.approx(sum(correct) / 3)
    loss.backward()
    assert task.model.token_embedding.weight.grad is not None


@pytest.mark.parametrize(
    "spec",
    [
        {"word_groups": [["circle"]]},
        {"word_groups": ["circle", "square"]},
        {"word_groups": [["circle", "square"]], "weight": 0},
        {"word_groups": [["circle", "square"], ["square", "star"]]},
        {"groups": [["circle", "square"]]},
        {"word_groups": [["circle", "square"]], "weight": None},
        {"word_groups": [[1], 5]},
        {"word_groups": [["Circle", "circle"]]},
        {"word_groups": [["circle", "square"]], "swaps": "some"},
    ],
)
def test_bad_hard_negative_configs_are_refused_with_the_key_named(spec) -> None:
    with pytest.raises(ConfigError, match="task.hard_negatives"):
        CLIPTask(MODEL, hard_negatives=spec)


# -- distributed correctness: 2 processes with gather_with_grad == 1 process on the whole batch ---


def _ddp_rank(rank: int, port: int, images, tokens, positives, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, _ = tiny_clip(seed=0)
        ddp = DistributedDataParallel(model)
        if positives is None:
            loss_fn = make_loss("clip", local_loss=True, gather_with_grad=True, rank=rank, world_size=2)
        else:  # the whole batch's matrix, as CLIPTask.batch_positives gathers it on every rank
            loss_fn = MultiPositiveClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=2)
        half = len(images) // 2
        out = ddp(images[rank * half : (rank + 1) * half], tokens[rank * half : (rank + 1) * half])
        extra = {} if positives is None else {"positives": positives}
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], **extra)
        loss.backward()  # DDP averages the gradients over the two ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        # numpy arrays travel by value (tensors would be shared memory, gone when this process exits)
        queue.put((rank, (mean_loss / 2).item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("multi_positive", [False, True], ids=["clip", "multi-positive"])
def test_two_rank_loss_and_gradients_equal_one_process_on_the_whole_batch(multi_positive: bool) -> None:
    import torch.multiprocessing as mp

    images, tokens = inputs(8, seed=5)
    model, _ = tiny_clip(seed=0)
    out = model(images, tokens)
    positives = None
    if multi_positive:  # positives that cross the ranks' halves, in both directions, and one that is one-way
        positives = torch.eye(8, dtype=torch.bool)
        positives[1, 6] = positives[6, 1] = positives[2, 3] = positives[7, 0] = True
        reference = MultiPositiveClipLoss()(
            out["image_features"], out["text_features"], out["logit_scale"], positives=positives
        )
    else:
        reference = make_loss("clip", local_loss=False, gather_with_grad=False, rank=0, world_size=1)(
            out["image_features"], out["text_features"], out["logit_scale"]
        )
    reference.backward()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_ddp_rank, args=(r, port, images, tokens, positives, queue)) for r in range(2)]
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
