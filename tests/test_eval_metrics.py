"""CLIP score and FID (trainer/eval/metrics.py) against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
from PIL import Image

from trainer.errors import MissingFileError
from trainer.eval import metrics
from trainer.models.clip import build_clip, export_clip

CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def images(n: int, seed: int, offset: float = 0.0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(128 + offset, 40, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def test_clip_score_matches_open_clips_own_preprocessing_and_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_clip("eval-test-clip", CLIP)
    export_clip(model, "eval-test-clip", CLIP, tmp_path / "clip")
    pictures, prompts = images(3, seed=0), ["a red circle", "a blue square", "a green star"]
    score = metrics.clip_score(pictures, prompts, tmp_path / "clip")

    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'clip'}")
    with torch.no_grad():
        image_features = reference.encode_image(torch.stack([preprocess(p) for p in pictures]))
        text_features = reference.encode_text(tokenizer(prompts))
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features)
    assert score == pytest.approx((100 * cosine.clamp_min(0)).mean().item(), abs=1e-3)
    assert 0 <= score <= 100


class MeanColors(torch.nn.Module):
    """A feature extractor for tests: the mean colour of each 8 x 8 block (uint8 images in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x.float() / 255, 8).flatten(1).double()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_with_a_feature_extractor_matches_the_closed_form() -> None:
    real, fake = images(64, seed=1), images(64, seed=2, offset=30)
    extractor = MeanColors()
    value = metrics.fid(real, fake, feature_extractor=extractor)
    features = [extractor(metrics.to_uint8_batch(s)).numpy() for s in (real, fake)]
    assert value == pytest.approx(frechet(*features), rel=1e-3)
    assert metrics.fid(real, real, feature_extractor=extractor) == pytest.approx(0.0, abs=1e-6)
    assert value > metrics.fid(real, images(64, seed=3), feature_extractor=extractor)  # shifted colours: farther


def test_fid_without_local_inception_weights_says_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=metrics.INCEPTION_FILE):
        metrics.fid(images(2, 0), images(2, 1), inception_weights=tmp_path / "missing.pth")


def test_cli_reports_clip_score_for_a_sample_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model, _ = build_clip("eval-test-clip", CLIP)
    export_clip(model, "eval-test-clip", CLIP, tmp_path / "clip")
    samples = tmp_path / "samples"
    samples.mkdir()
    lines = []
    for index, picture in enumerate(images(2, seed=0)):
        picture.save(samples / f"{index:04d}.png")
        lines.append(json.dumps({"file": f"{index:04d}.png", "prompt": f"prompt {index}"}))
    (samples / "prompts.jsonl").write_text("\n".join(lines))
    assert metrics.main([str(samples), "--clip", str(tmp_path / "clip")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 2 and 0 <= report["clip_score"] <= 100
    assert metrics.main([str(samples)]) == 2  # nothing asked: a clear error
    assert "nothing to compute" in capsys.readouterr().err
