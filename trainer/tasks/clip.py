"""Stage 1: contrastive image-text training of an open_clip model.

The model, tokenizer and losses are open_clip's; this module adds what training needs around them:
parameter groups without weight decay on gains, biases, embeddings and the logit scale, warmup then
cosine, tower locking, the logit-scale clamp, hard-negative captions (NegCLIP-style word swaps), several positives
per caption for captions that name only some attributes, and evaluation on held-out shards (retrieval recall@k,
zero-shot classification).
"""

from __future__ import annotations

import importlib
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from trainer.errors import ConfigError
from trainer.models.clip import LOGIT_SCALE_MAX, build_clip, export_clip
from trainer.tasks.compilation import compile_in_place, forward_context
from trainer.tasks.optimization import adamw_with_schedule

log = logging.getLogger(__name__)
LOSSES = ("clip", "siglip")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, embeddings and the logit scale/bias are not decayed (as in open_clip)."""
    return param.ndim < 2 or any(s in name for s in ("bias", "ln", "bn", "norm", "logit_", "embedding"))


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k of matching pairs (row i of each) for image->text and text->image retrieval."""
    similarity = image_features @ text_features.T  # (N images, N texts)
    target = torch.arange(len(similarity), device=similarity.device)
    metrics = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        # rank of the true match = number of candidates scored strictly higher
        true_scores = scores[target, target].unsqueeze(1)
        rank = (scores > true_scores).sum(dim=1)
        for k in ks:
            metrics[f"{direction}_R@{k}"] = (rank < k).float().mean().item()
    return metrics


def make_loss(kind: str, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int) -> torch.nn.Module:
    """open_clip's contrastive (InfoNCE) or sigmoid (SigLIP) loss, set up for this rank."""
    if kind == "clip":
        return ClipLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ConfigError(f"task.loss must be one of {LOSSES}, got {kind!r}")


def positive_pairs(image_meta: Sequence[Mapping], caption_attributes: Sequence[Mapping]) -> torch.Tensor:
    """(images, captions) booleans: True where the image's metadata agrees with every attribute the caption
    names. A caption that names nothing the parser reads (a caption of other data) fits no image here, its own
    included (:meth:`CLIPTask.batch_positives` adds each image's own caption); an attribute missing from an
    image's metadata fits no caption that names it."""
    names = sorted({name for attributes in caption_attributes for name in attributes})
    fits = torch.ones(len(image_meta), len(caption_attributes), dtype=torch.bool)
    for name in names:  # one attribute at a time: no (images, captions, attributes) tensor
        codes: dict[Any, int] = {}
        # the caption's value as an integer; -1: the caption does not name it; -2: the image lacks it
        named = torch.tensor([codes.setdefault(a[name], len(codes)) if name in a else -1 for a in caption_attributes])
        image = torch.tensor([codes.get(m[name], -2) if name in m else -2 for m in image_meta])
        fits &= (named.unsqueeze(0) == -1) | (named.unsqueeze(0) == image.unsqueeze(1))
    names_something = torch.tensor([bool(a) for a in caption_attributes], dtype=torch.bool)
    return fits & names_something.unsqueeze(0)


class MultiPositiveClipLoss(ClipLoss):
    """open_clip's InfoNCE loss where a caption may fit several images of the batch and an image several
    captions: the target of each row is spread evenly over its positives (UniCL, Yang et al., 2022). With one
    positive per row, the image's own caption, it is ClipLoss. ``positives`` is the (images, captions) matrix
    of the whole global batch, ranks in order (:func:`positive_pairs`); features are gathered as ClipLoss
    gathers them (``local_loss``, ``gather_with_grad``)."""

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, *, positives: torch.Tensor):  # noqa: D102
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        # targets and log-probabilities in float32: under bf16 autocast 1/k and sums over many positives round
        positives = positives.to(device=logits_per_image.device, dtype=torch.float32)
        if self.world_size > 1 and self.local_loss:
            if len(positives) != self.world_size * len(image_features):
                raise ValueError(
                    f"MultiPositiveClipLoss: the positives cover {len(positives)} pairs, but {self.world_size} ranks "
                    f"of {len(image_features)} make {self.world_size * len(image_features)}; every rank needs the "
                    f"same batch size (as open_clip's gathered loss does)"
                )
            rows = slice(self.rank * len(image_features), (self.rank + 1) * len(image_features))
            image_targets, text_targets = positives[rows], positives[:, rows].T
        else:
            image_targets, text_targets = positives, positives.T

        def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            targets = targets / targets.sum(dim=1, keepdim=True)
            return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()

        return (
            soft_cross_entropy(logits_per_image, image_targets) + soft_cross_entropy(logits_per_text, text_targets)
        ) / 2


def _caption_parser(spec: Any) -> Callable[[str], Mapping] | None:
    """``task.positives``: null, or the dotted path of a function caption -> {attribute: value it names}."""
    if spec is None:
        return None
    module, _, name = spec.rpartition(".") if isinstance(spec, str) else ("", "", "")
    try:
        parser = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        parser = None
    if not callable(parser):
        raise ConfigError(
            f"task.positives must be null or the dotted path of a function caption -> {{attribute: value}} "
            f"(e.g. trainer.data.shapes.caption_attributes); {spec!r} names no such function"
        )
    return parser


def swapped_caption(
    caption: str, pattern: re.Pattern, groups: Sequence[Sequence[str]], rng: random.Random
) -> str | None:
    """``caption`` with one word of a group (say the shape "circle") replaced by another word of the same group
    ("star"): a hard negative that differs from the caption in that attribute only. The word is drawn among the
    group words the caption holds; None when it holds none. ``pattern`` is :func:`word_group_pattern`'s."""
    swaps = swapped_captions(caption, pattern, groups, rng, every=False)
    return swaps[0] if swaps else None


def swapped_captions(
    caption: str, pattern: re.Pattern, groups: Sequence[Sequence[str]], rng: random.Random, every: bool = True
) -> list[str]:
    """The hard negatives of ``caption``: one of its group words, drawn at random, replaced by each other word of
    its group (``every``), or by one of them drawn at random; empty when the caption holds no group word."""
    found = list(pattern.finditer(caption))
    if not found:
        return []
    match = rng.choice(found)
    word = match.group(0).lower()
    group = next(g for g in groups if word in g)
    others = [w for w in group if w != word]
    if not every:
        others = [rng.choice(others)]
    return [caption[: match.start()] + other + caption[match.end() :] for other in others]


def word_group_pattern(groups: Sequence[Sequence[str]]) -> re.Pattern:
    """A case-insensitive regex for any word (or phrase) of ``groups``, longest first ("top left" before "top")."""
    words = sorted({w for g in groups for w in g}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _hard_negative_spec(spec: Any) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or set(spec) - {"word_groups", "weight", "swaps"}:
        raise ConfigError(
            f"task.hard_negatives must be null or {{word_groups: [[...], ...], weight: w, swaps: one|all}}, got {spec!r}"
        )
    groups = spec.get("word_groups")
    valid = isinstance(groups, list | tuple) and groups
    valid = valid and all(isinstance(g, list | tuple) and all(isinstance(w, str) for w in g) for g in groups)
    if not valid or any(len({w.lower() for w in g}) < 2 for g in groups):
        raise ConfigError(
            "task.hard_negatives.word_groups must be a list of word lists, each with at least two different words "
            f"(e.g. [[circle, square, triangle]]), got {groups!r}"
        )
    weight = spec.get("weight", 1.0)
    if not isinstance(weight, int | float) or weight <= 0:
        raise ConfigError(f"task.hard_negatives.weight must be a number > 0, got {weight!r}")
    swaps = spec.get("swaps", "one")
    if swaps not in ("one", "all"):
        raise ConfigError(f"task.hard_negatives.swaps must be 'one' or 'all', got {swaps!r}")
    lowered = [list(dict.fromkeys(w.lower() for w in g)) for g in groups]
    seen = [w for g in lowered for w in g]
    if len(seen) != len(set(seen)):
        raise ConfigError(f"task.hard_negatives.word_groups: a word is in more than one group: {groups!r}")
    return {"groups": lowered, "weight": float(weight), "swaps": swaps, "pattern": word_group_pattern(lowered)}


def _zero_shot_spec(spec: Any) -> dict[str, dict]:
    if spec is None:
        return {}
    if spec == "shapes":
        from trainer.data.shapes import zero_shot_classes

        return zero_shot_classes()
    if isinstance(spec, Mapping):
        for attribute, entry in spec.items():
            if not {"classes", "templates", "field"} <= set(entry):
                raise ConfigError(f"task.zero_shot.{attribute} needs classes, templates and field")
        return {k: dict(v) for k, v in spec.items()}
    raise ConfigError(f"task.zero_shot must be null, 'shapes' or a mapping of attributes; got {spec!r}")


class CLIPTask(pl.LightningModule):
    def __init__(
        self,
        model: Mapping[str, Any],
        loss: str = "clip",
        local_loss: bool = True,
        gather_with_grad: bool = True,
        lock_image: bool = False,
        lock_text: bool = False,
        grad_checkpointing: bool = False,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        zero_shot: Any = None,
        hard_negatives: Mapping[str, Any] | None = None,
        positives: str | None = None,
        retrieval_ks: Sequence[int] = (1, 5, 10),
        export: bool = True,
        compile: Any = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"task.loss must be one of {LOSSES}, got {loss!r}")
        self.save_hyperparameters()
        self.model, self.tokenizer = build_clip(
            model["name"], model.get("config"), model.get("pretrained"), siglip=loss == "siglip"
        )
        if lock_image:
            self.model.lock_image_tower()
        if lock_text:
            self.model.lock_text_tower()
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        compile_in_place(self.model, compile)
        self.optimizer_cfg = {"lr": 5e-4, "weight_decay": 0.2, "betas": (0.9, 0.98), "eps": 1e-6, **(optimizer or {})}
        self.scheduler_cfg = {"warmup_steps": 0, "total_steps": None, "min_lr_ratio": 0.0, **(scheduler or {})}
        self.zero_shot = _zero_shot_spec(zero_shot)
        self.hard_negatives = _hard_negative_spec(hard_negatives)
        self.caption_parser = _caption_parser(positives)
        if self.caption_parser is not None and loss != "clip":
            raise ConfigError(f"task.positives needs task.loss: clip (the InfoNCE loss), not {loss!r}")
        self.retrieval_ks = tuple(retrieval_ks)
        self.loss_fn: torch.nn.Module | None = None
        self._val_outputs: list[dict] = []

    def check_image_size(self, size: int, key: str) -> None:
        """Before any data is read: the image tower takes images of one size only (its positional embedding)."""
        expected = self.model.visual.image_size
        expected = expected[0] if isinstance(expected, (tuple, list)) else expected
        if size != expected:
            raise ConfigError(
                f"{key}={size}, but the CLIP image tower ({self.hparams.model['name']}) takes {expected} px images: "
                f"set {key}={expected}, or change the model's image_size"
            )

    def setup(self, stage: str) -> None:
        rank, world_size = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        hp = self.hparams
        if self.caption_parser is not None:
            self.loss_fn = MultiPositiveClipLoss(hp.local_loss, hp.gather_with_grad, rank=rank, world_size=world_size)
        else:
            self.loss_fn = make_loss(hp.loss, hp.local_loss, hp.gather_with_grad, rank, world_size)

    def contrastive_loss(
        self, images: torch.Tensor, tokens: torch.Tensor, positives: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        out = self.model(images, tokens)
        args = [out["image_features"], out["text_features"], out["logit_scale"]]
        if "logit_bias" in out:
            args.append(out["logit_bias"])
        if positives is not None:
            return self.loss_fn(*args, positives=positives), out
        return self.loss_fn(*args), out

    def batch_positives(self, captions: Sequence[str], metas: Sequence[Mapping]) -> torch.Tensor:
        """The global batch's (images, captions) positive pairs (:func:`positive_pairs`, and each image with its own
        caption), the same on every rank: each rank's parsed captions, then its images' values of the attributes
        any caption names (not each sample's whole json), are gathered, ranks in order, as the loss gathers
        features."""
        # a parser's None ("cannot read it") names nothing
        named = [dict(self.caption_parser(caption) or {}) for caption in captions]
        named = self._gather_objects(named)
        names = {name for attributes in named for name in attributes}
        values = self._gather_objects([{n: meta[n] for n in names if n in meta} for meta in metas])
        positives = positive_pairs(values, named)
        return positives | torch.eye(len(positives), dtype=torch.bool)  # an image always fits its own caption

    def _gather_objects(self, items: list) -> list:
        """Every rank's ``items`` concatenated, ranks in order (the list itself on one process)."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size == 1:
            return items
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, items)
        return [item for rank_items in gathered for item in rank_items]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = len(batch["image"])
        positives = None
        if self.caption_parser is not None:
            positives = self.batch_positives(batch["caption"], batch["meta"])
            self.log("train/positives_per_caption", positives.float().sum(0).mean(), batch_size=batch_size)
        loss, out = self.contrastive_loss(batch["image"], batch["tokens"], positives)
        if self.hard_negatives is not None:
            negative_loss, accuracy = self.hard_negative_loss(batch["caption"], out)
            self.log("train/contrastive_loss", loss, batch_size=batch_size)
            self.log("train/hard_negative_loss", negative_loss, batch_size=batch_size)
            self.log("train/hard_negative_accuracy", accuracy, batch_size=batch_size)
            loss = loss + self.hard_negatives["weight"] * negative_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)  # what is optimized
        self.log("train/logit_scale", out["logit_scale"].detach().float(), batch_size=batch_size)
        return loss

    def hard_negative_loss(self, captions: Sequence[str], out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """NegCLIP's hard negatives (Yuksekgonul et al., 2023), as a term of their own: each image scores its
        caption against its twins with one group word swapped (:func:`swapped_captions`: one twin, or with
        ``swaps: all`` one per other word of the group), a softmax at the model's temperature. The in-batch
        loss alone rarely needs an attribute whose words never decide between two captions of a batch (on the
        shapes data color and position already tell 64 captions apart, so nothing teaches shape); this term
        does. Local to each rank; the swaps are seeded by the step and rank, so a resumed run draws the same
        ones. Returns (loss, accuracy: how often the image already scores its own caption above every twin)."""
        spec = self.hard_negatives
        rng = random.Random(f"hard-negatives/{self.global_step}/{self.global_rank}")
        every = spec["swaps"] == "all"
        rows = [(i, swapped_captions(c, spec["pattern"], spec["groups"], rng, every)) for i, c in enumerate(captions)]
        rows = [(i, negatives) for i, negatives in rows if negatives]
        if not rows:
            zero = out["logit_scale"].new_zeros(())
            return zero, zero
        index = torch.tensor([i for i, _ in rows], device=self.device)
        flat = [n for _, negatives in rows for n in negatives]
        # scores in float32: under bf16 autocast the features are bf16, whose logits step by ~0.06 at scale 14
        negative = F.normalize(self.model.encode_text(self.tokenizer(flat).to(self.device)).float(), dim=-1)
        image, text = out["image_features"][index].float(), out["text_features"][index].float()
        scale = out["logit_scale"].float()
        # (rows, 1 + most twins): the caption's score, then its twins'; groups of fewer words pad with -inf
        width = max(len(negatives) for _, negatives in rows)
        row = torch.tensor([r for r, (_, negatives) in enumerate(rows) for _ in negatives], device=self.device)
        column = torch.tensor([1 + k for _, negatives in rows for k in range(len(negatives))], device=self.device)
        scores = torch.full((len(rows), 1 + width), float("-inf"), device=self.device)
        scores = scores.index_put((row, column), (image[row] * negative).sum(-1) * scale)
        scores[:, 0] = (image * text).sum(-1) * scale
        target = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        accuracy = (scores[:, 0:1] > scores[:, 1:]).all(dim=1).float().mean()
        return F.cross_entropy(scores, target), accuracy

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # keep the temperature in range right after each step, as open_clip does: before any callback's
        # on_train_batch_end, so a checkpoint written there holds the clamped value
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def on_train_end(self) -> None:
        """Export the trained model as an open_clip folder: <run folder>/export/clip."""
        if self.hparams.export and self.trainer.is_global_zero:
            spec = self.hparams.model
            out = export_clip(
                self.model, spec["name"], spec.get("config"), Path(self.trainer.default_root_dir) / "export" / "clip"
            )
            log.info("exported CLIP for open_clip to %s (open_clip.create_model('local-dir:%s'))", out, out)

    # -- evaluation -----------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(batch["image"], batch["tokens"])
        self._val_outputs.append(
            {
                "image": out["image_features"].float(),
                "text": out["text_features"].float(),
                "meta": batch["meta"],
            }
        )

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' rows concatenated; ranks may hold different numbers of rows."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        sizes = self.all_gather(torch.tensor([len(tensor)], device=tensor.device)).flatten()
        padded = F.pad(tensor, (0, 0, 0, int(sizes.max()) - len(tensor)))
        gathered = self.all_gather(padded)  # (world, max rows, dim)
        return torch.cat([gathered[r, : int(n)] for r, n in enumerate(sizes)])

    @torch.no_grad()
    def class_embeddings(self, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot classifier weights: the normalized mean text embedding of each class's prompts, in the training
        precision (as the image features it is compared with)."""
        weights = []
        for name in classes:
            tokens = self.tokenizer([template.format(name) for template in templates]).to(self.device)
            with forward_context(self):
                text = self.model.encode_text(tokens)
            embedding = F.normalize(text.float(), dim=-1).mean(dim=0)
            weights.append(F.normalize(embedding, dim=0))
        return torch.stack(weights)  # (classes, dim)

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        if not outputs:
            return
        image = torch.cat([o["image"] for o in outputs])
        text = torch.cat([o["text"] for o in outputs])
        metrics = {}
        for attribute, spec in self.zero_shot.items():
            labels = [meta.get(spec["field"]) for o in outputs for meta in o["meta"]]
            target = torch.tensor(
                [spec["classes"].index(label) if label in spec["classes"] else -1 for label in labels],
                device=self.device,
            )
            predicted = (image @ self.class_embeddings(spec["classes"], spec["templates"]).T).argmax(dim=1)
            correct = ((predicted == target) & (target >= 0)).sum()
            counted = (target >= 0).sum()
            correct, counted = self._gather(correct.view(1, 1)).sum(), self._gather(counted.view(1, 1)).sum()
            metrics[f"val/zero_shot_{attribute}_accuracy"] = (correct / counted.clamp(min=1)).item()
        image, text = self._gather(image), self._gather(text)
        for name, value in retrieval_recall(image, text, self.retrieval_ks).items():
            metrics[f"val/{name}"] = value
        metrics["val/samples"] = float(len(image))
        # every rank computed the same numbers from the gathered features
        self.log_dict(metrics, sync_dist=False, rank_zero_only=False)

    # -- optimization ---------------------------------------------------------------------------

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if no_weight_decay(name, param) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.optimizer_cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return adamw_with_schedule(groups, self.optimizer_cfg, self.scheduler_cfg, self.trainer.max_steps)
