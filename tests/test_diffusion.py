"""Diffusion maths: schedules against their closed forms, objective conversions, and every sampler on a
Gaussian toy whose exact denoiser is known, D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.diffusion import (
    SAMPLERS,
    DiscreteDenoiser,
    GuidedDenoiser,
    alphas_cumprod,
    beta_schedule,
    classifier_free_guidance,
    diffusion_loss,
    get_sampler,
    get_sigmas,
    img2img_start,
    karras_sigmas,
    min_snr_weight,
    offset_noise,
    predicted_eps,
    predicted_x0,
    q_sample,
    rescale_zero_terminal_snr,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
    snr,
    timestep_to_sigma,
    training_target,
)
from trainer.errors import ConfigError

# The toy data: x0 ~ N(MU, S^2 I) in two dimensions.
MU = torch.tensor([1.5, -0.5])
S = 0.5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The toy tensors are small: synchronising threads costs more than they save (8x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma eps = x] for the toy data."""
    mu = MU.to(x)
    return mu + S**2 / (S**2 + sigma[:, None].to(x) ** 2) * (x - mu)


def sd_alphas_cumprod() -> torch.Tensor:
    return alphas_cumprod(beta_schedule("scaled_linear"))


def zero_snr_alphas_cumprod() -> torch.Tensor:
    return alphas_cumprod(rescale_zero_terminal_snr(beta_schedule("scaled_linear")))


# ---------------------------------------------------------------------------------------------- schedules


def test_linear_schedules_endpoints_and_monotonicity():
    linear = beta_schedule("linear", 1000, 1e-4, 2e-2)
    assert linear.dtype == torch.float64 and linear.shape == (1000,)
    assert linear[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert linear[-1].item() == pytest.approx(2e-2, rel=1e-12)
    assert torch.allclose(linear.diff(), torch.full((999,), (2e-2 - 1e-4) / 999, dtype=torch.float64))

    scaled = beta_schedule("scaled_linear")
    assert scaled[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert scaled[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert (scaled.diff() > 0).all()
    assert torch.allclose(scaled.sqrt().diff(), scaled.sqrt().diff()[0].expand(999))

    for betas in (linear, scaled):
        assert (alphas_cumprod(betas).diff() < 0).all()


def test_cosine_schedule_matches_its_formula():
    steps, offset = 1000, 8e-3
    betas = beta_schedule("cosine", steps, cosine_s=offset)

    def f(t: int) -> float:
        return math.cos((t / steps + offset) / (1 + offset) * math.pi / 2) ** 2

    expected = torch.tensor([f(t) / f(0) for t in range(1, steps)], dtype=torch.float64)
    assert torch.allclose(alphas_cumprod(betas)[:-1], expected, rtol=1e-10, atol=0)
    assert betas[-1].item() == 0.999  # f(T) = 0: the last beta would be 1, clipped
    assert betas.max().item() == 0.999 and (betas[:-1] < 0.999).all()


def test_unknown_schedule_names_raise():
    with pytest.raises(ConfigError, match="beta schedule"):
        beta_schedule("quadratic")
    with pytest.raises(ConfigError, match="sigma schedule"):
        get_sigmas(sd_alphas_cumprod(), 10, "exponential")
    with pytest.raises(ConfigError, match="sampler"):
        get_sampler("plms")
    with pytest.raises(ConfigError, match="objective"):
        training_target("score", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.ones(1))


def test_zero_terminal_snr_rescaling():
    betas = beta_schedule("scaled_linear")
    original = alphas_cumprod(betas)
    rescaled_betas = rescale_zero_terminal_snr(betas)
    rescaled = alphas_cumprod(rescaled_betas)
    assert rescaled[-1].item() == 0.0 and rescaled_betas[-1].item() == 1.0
    assert rescaled[0].item() == pytest.approx(original[0].item(), rel=1e-12)
    assert ((rescaled_betas > 0) & (rescaled_betas <= 1)).all()
    # sqrt(alpha-bar) is shifted and scaled: an affine function of the original one.
    root, new_root = original.sqrt(), rescaled.sqrt()
    scale = root[0] / (root[0] - root[-1])
    assert torch.allclose(new_root, (root - root[-1]) * scale, rtol=0, atol=1e-12)


def test_q_sample_statistics():
    ac = sd_alphas_cumprod()
    t = torch.tensor([0, 250, 600, 999])
    x0 = torch.full((4, 100_000), 2.0)
    generator = seeded(0)
    x_t = q_sample(x0, t, torch.randn(x0.shape, generator=generator), ac)
    assert x_t.dtype == torch.float32
    alpha_bar = ac[t].float()
    assert torch.allclose(x_t.mean(dim=1), 2.0 * alpha_bar.sqrt(), atol=0.01)
    assert torch.allclose(x_t.var(dim=1), 1 - alpha_bar, rtol=0.02)


def test_snr_and_sigmas():
    ac = sd_alphas_cumprod()
    sigmas = sigmas_from_alphas_cumprod(ac)
    assert torch.allclose(snr(ac), sigmas**-2, rtol=1e-12)
    assert (sigmas.diff() > 0).all()
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4) and sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)


def test_karras_sigmas_endpoints_and_rho_spacing():
    sigmas = karras_sigmas(12, 0.03, 80.0, rho=7.0)
    assert sigmas.shape == (12,)
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-12) and sigmas[-1].item() == pytest.approx(0.03, rel=1e-12)
    roots = sigmas ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(11), rtol=1e-10)
    assert (roots.diff() < 0).all()


def test_sigma_timestep_maps_invert_each_other():
    ac = sd_alphas_cumprod()
    timesteps = torch.tensor([0.0, 1.0, 10.5, 500.0, 998.25, 999.0], dtype=torch.float64)
    sigmas = timestep_to_sigma(timesteps, ac)
    assert torch.allclose(sigmas[[0, 1, 3, 5]], sigmas_from_alphas_cumprod(ac)[[0, 1, 500, 999]], rtol=1e-12)
    assert torch.allclose(sigma_to_timestep(sigmas, ac), timesteps, rtol=0, atol=1e-9)
    # Sigmas beyond the schedule clamp to its ends.
    assert sigma_to_timestep(torch.tensor([1e-4, 1e3], dtype=torch.float64), ac).tolist() == [0.0, 999.0]


@pytest.mark.parametrize("schedule", ["uniform", "leading", "trailing", "karras"])
def test_get_sigmas_shapes(schedule):
    ac = sd_alphas_cumprod()
    sigmas = get_sigmas(ac, 50, schedule)
    assert sigmas.shape == (51,) and sigmas[-1].item() == 0.0
    assert (sigmas.diff() < 0).all()
    first_timestep = {"uniform": 999, "leading": 981, "trailing": 999, "karras": 999}[schedule]
    assert sigmas[0].item() == pytest.approx(sigmas_from_alphas_cumprod(ac)[first_timestep].item(), rel=1e-12)
    timesteps = sigma_to_timestep(sigmas[:-1], ac)
    if schedule in ("leading", "trailing"):
        assert torch.allclose(timesteps, timesteps.round(), atol=1e-9)
        assert timesteps.round()[-1].item() == {"leading": 1, "trailing": 19}[schedule]
    if schedule == "karras":
        assert sigmas[-2].item() == pytest.approx(sigmas_from_alphas_cumprod(ac)[0].item(), rel=1e-12)


def test_get_sigmas_on_a_zero_terminal_snr_schedule_is_finite():
    sigmas = get_sigmas(zero_snr_alphas_cumprod(), 20, "trailing")
    assert torch.isfinite(sigmas).all()
    assert sigmas[0].item() == pytest.approx(4096.0, rel=1e-3)


# --------------------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_objective_conversions_invert_each_other(objective):
    ac = zero_snr_alphas_cumprod()[:-1]  # (eps and x0 are undefined at zero SNR)
    generator = seeded(0)
    x0 = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 998])
    x_t = q_sample(x0, t, noise, ac)
    target = training_target(objective, x0, noise, t, ac)
    assert torch.allclose(predicted_x0(objective, target, x_t, t, ac), x0, rtol=0, atol=1e-10)
    assert torch.allclose(predicted_eps(objective, target, x_t, t, ac), noise, rtol=0, atol=1e-10)
    if objective == "v":
        alpha_bar = ac[t][:, None, None, None]
        assert torch.allclose(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0, rtol=0, atol=1e-12)


def test_min_snr_weights_match_their_formulas():
    snr_t = torch.tensor([0.0, 0.5, 1.0, 5.0, 20.0])
    gamma = 5.0
    assert torch.allclose(min_snr_weight(snr_t, gamma, "eps"), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weight(snr_t, gamma, "v"), torch.tensor([0.0, 0.5 / 1.5, 0.5, 5 / 6, 5 / 21]))
    assert torch.allclose(min_snr_weight(snr_t, gamma, "x0"), torch.tensor([0.0, 0.5, 1.0, 5.0, 5.0]))


def test_offset_noise():
    shape = (256, 4, 32, 32)
    plain = torch.randn(shape, generator=seeded(3))
    assert torch.equal(offset_noise(shape, 0.0, seeded(3)), plain)
    noise = offset_noise(shape, 0.1, seeded(3))
    assert noise.shape == shape
    # Channel means: 1 / 32 from the per-pixel noise and 0.1 from the offset.
    channel_means = noise.mean(dim=(2, 3))
    assert channel_means.std().item() == pytest.approx(math.sqrt(0.1**2 + 1 / 32**2), rel=0.1)


def test_diffusion_loss_is_per_sample_and_weighted():
    output = torch.zeros(3, 2, 2, 2)
    target = torch.stack([torch.full((2, 2, 2), value) for value in (1.0, 2.0, 3.0)])
    assert torch.equal(diffusion_loss(output, target), torch.tensor([1.0, 4.0, 9.0]))
    weight = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert torch.equal(diffusion_loss(output, target, weight), torch.tensor([1.0, 2.0, 0.0]))


# ----------------------------------------------------------------------------------------------- samplers

# Steps per sampler: first-order samplers carry an O(1 / steps) bias in the sample variance (ancestral
# ones most: about -10 % at 50 uniform steps on this toy, as the closed-form variance recursion confirms),
# so they get more steps for a 5 % check than the second-order DPM-Solver++(2M).
SAMPLER_CASES = [
    ("euler", {}, 100),
    ("ddim", {}, 100),
    ("dpmpp_2m", {}, 50),
    ("euler_ancestral", {}, 250),
    ("euler_ancestral", {"eta": 0.5}, 250),
    ("ddim", {"eta": 0.5}, 250),
    ("ddpm", {}, 250),
]


@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize(("name", "options", "steps"), SAMPLER_CASES)
def test_sampler_recovers_gaussian_data(name, options, steps, schedule):
    sigmas = get_sigmas(sd_alphas_cumprod(), steps, schedule)
    generator = seeded(0)
    # Start from the exact marginal at sigma_max, N(mu, s^2 + sigma_max^2): a N(0, sigma_max^2) start
    # would carry a mean error of about mu s / sigma_max = 0.05 through the ODE samplers.
    x = MU + (S**2 + sigmas[0].item() ** 2) ** 0.5 * torch.randn(20_000, 2, generator=generator)
    samples = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=generator, **options)
    assert samples.dtype == torch.float32
    assert torch.allclose(samples.mean(dim=0), MU, atol=0.03)
    assert torch.allclose(samples.std(dim=0), torch.full((2,), S), rtol=0.05)


def test_full_ddpm_recovers_gaussian_data():
    """The classic sampler: all 1000 timesteps of the schedule."""
    sigmas = get_sigmas(sd_alphas_cumprod(), 1000)
    generator = seeded(1)
    x = MU + (S**2 + sigmas[0].item() ** 2) ** 0.5 * torch.randn(20_000, 2, generator=generator)
    samples = sample_ddpm(gaussian_denoiser, x, sigmas, generator=generator)
    assert torch.allclose(samples.mean(dim=0), MU, atol=0.02)
    assert torch.allclose(samples.std(dim=0), torch.full((2,), S), rtol=0.025)


def toy_start(count: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    sigmas = get_sigmas(sd_alphas_cumprod(), 30, "karras")
    noise = torch.randn(count, 2, generator=seeded(seed), dtype=torch.float64)
    return noise * sigmas[0], sigmas


def test_ddim_without_eta_is_deterministic_and_equals_euler():
    x, sigmas = toy_start()
    first = sample_ddim(gaussian_denoiser, x, sigmas, generator=seeded(1))
    second = sample_ddim(gaussian_denoiser, x, sigmas, generator=seeded(2))
    assert torch.equal(first, second)
    assert torch.equal(first, sample_ddim(gaussian_denoiser, x, sigmas))
    assert torch.allclose(first, sample_euler(gaussian_denoiser, x, sigmas), rtol=0, atol=1e-12)
    assert torch.allclose(first, sample_euler_ancestral(gaussian_denoiser, x, sigmas, eta=0.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ancestral_samplers_take_the_same_step(eta):
    """DDIM's eta noise, Euler ancestral and (eta = 1) DDPM's posterior are one step written three ways."""
    x, sigmas = toy_start()
    ddim = sample_ddim(gaussian_denoiser, x, sigmas, generator=seeded(5), eta=eta)
    ancestral = sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=seeded(5), eta=eta)
    assert torch.allclose(ddim, ancestral, rtol=0, atol=1e-10)
    if eta == 1.0:
        ddpm = sample_ddpm(gaussian_denoiser, x, sigmas, generator=seeded(5))
        assert torch.allclose(ddim, ddpm, rtol=0, atol=1e-10)
    different_seed = sample_ddim(gaussian_denoiser, x, sigmas, generator=seeded(6), eta=eta)
    assert not torch.allclose(ddim, different_seed)


def test_ddim_inversion_round_trip():
    """Integrating the ODE from data up to sigma_max and back recovers the data (DDIM inversion). The
    first-order round trip error falls as 1 / steps: about 4e-3 at 1000 Karras steps on this toy."""
    ac = sd_alphas_cumprod()
    log_sigmas = sigmas_from_alphas_cumprod(ac).log()
    sigmas = karras_sigmas(5000, log_sigmas[0].exp().item(), log_sigmas[-1].exp().item())  # no trailing 0
    data = MU.double() + S * torch.randn(8, 2, generator=seeded(0), dtype=torch.float64)
    inverted = sample_ddim(gaussian_denoiser, data, sigmas.flip(0))
    assert inverted.std().item() > 5  # noise-like at sigma_max ~ 14.6
    recovered = sample_ddim(gaussian_denoiser, inverted, sigmas)
    assert torch.allclose(recovered, data, rtol=0, atol=1e-3)


def test_callback_sees_every_step():
    x, sigmas = toy_start()
    seen = []
    result = sample_dpmpp_2m(gaussian_denoiser, x, sigmas, callback=lambda step, x, denoised: seen.append((step, x)))
    assert [step for step, _ in seen] == list(range(len(sigmas) - 1))
    assert torch.equal(seen[-1][1], result)


def test_samplers_share_one_signature():
    x, sigmas = toy_start(4)
    extra = {"marker": 1}

    def denoiser(x, sigma, marker):
        assert marker == 1 and sigma.shape == (x.shape[0],)
        return gaussian_denoiser(x, sigma)

    for sampler in SAMPLERS.values():
        out = sampler(denoiser, x, sigmas, extra_args=extra, generator=seeded(0), callback=None)
        assert out.shape == x.shape and torch.isfinite(out).all()


# -------------------------------------------------------------------------------- discrete-time denoiser


def exact_discrete_model(objective: str, ac: torch.Tensor):
    """A "UNet" for the toy data: the exact posterior mean of the objective at x_t and (fractional) t."""

    def model(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = 1 / (1 + timestep_to_sigma(timesteps, ac) ** 2)[:, None]
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        mu = MU.double()
        residual = (x_t - a * mu) / (a**2 * S**2 + b**2)
        x0 = mu + a * S**2 * residual
        eps = b * residual
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[objective]

    return model


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_discrete_denoiser_is_the_exact_denoiser(objective, zero_snr):
    ac = zero_snr_alphas_cumprod() if zero_snr else sd_alphas_cumprod()
    denoiser = DiscreteDenoiser(exact_discrete_model(objective, ac), ac, objective)
    sigmas = torch.cat([get_sigmas(ac, 25, "uniform")[:-1], get_sigmas(ac, 25, "karras")[:-1]])
    noise = torch.randn(len(sigmas), 2, generator=seeded(0), dtype=torch.float64)
    x = MU.double() + sigmas[:, None] * noise
    assert torch.allclose(denoiser(x, sigmas), gaussian_denoiser(x, sigmas), rtol=1e-9, atol=1e-9)


def test_discrete_denoiser_calls_the_model_at_schedule_timesteps():
    ac = sd_alphas_cumprod()
    seen = {}

    def model(x_t, timesteps, context):
        seen["x_t"], seen["timesteps"], seen["context"] = x_t, timesteps, context
        return torch.zeros_like(x_t)

    sigma = sigmas_from_alphas_cumprod(ac)[[0, 500, 999]].float()
    x = torch.ones(3, 4, 8, 8)
    denoised = DiscreteDenoiser(model, ac, "eps")(x, sigma, context="prompt")
    assert seen["context"] == "prompt" and seen["timesteps"].dtype == torch.float32
    assert torch.allclose(seen["timesteps"], torch.tensor([0.0, 500.0, 999.0]), atol=1e-3)
    assert torch.allclose(seen["x_t"], ac[[0, 500, 999]].sqrt().float()[:, None, None, None].expand(3, 4, 8, 8))
    assert torch.allclose(denoised, x)  # zero noise predicted: D(x) = x - sigma * 0


def classic_ddim(model, x, timesteps: list[int], ac: torch.Tensor, eta: float, generator: torch.Generator):
    """DDIM as published, on x_t with an epsilon model: x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,
    s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'), and alpha-bar 1 after the last timestep."""
    for i, t in enumerate(timesteps):
        alpha_bar = ac[t]
        alpha_bar_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=ac.dtype)
        eps = model(x, torch.full((x.shape[0],), float(t), dtype=ac.dtype))
        x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        std = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - std**2).sqrt() * eps
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sample_ddim_on_a_discrete_model_is_published_ddim(eta):
    """sample_ddim with a DiscreteDenoiser on Stable Diffusion's DDIM timesteps reproduces the published
    update on x_t, fresh noise included, when both draw the same noise."""
    ac = sd_alphas_cumprod()
    model = exact_discrete_model("eps", ac)
    sigmas = get_sigmas(ac, 20, "leading")
    timesteps = sigma_to_timestep(sigmas[:-1], ac).round().long().tolist()
    assert timesteps[:2] == [951, 901] and timesteps[-1] == 1
    x = sigmas[0] * torch.randn(16, 2, generator=seeded(0), dtype=torch.float64)
    ours = sample_ddim(DiscreteDenoiser(model, ac, "eps"), x, sigmas, generator=seeded(1), eta=eta)
    published = classic_ddim(model, x * ac[timesteps[0]].sqrt(), timesteps, ac, eta, seeded(1))
    assert torch.allclose(ours, published, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------------------------- guidance


def context_denoiser(calls: list[int]):
    """D(x; sigma, context, mask) = x / (1 + sigma^2) + mean of the context tokens, times a mask."""

    def denoiser(x, sigma, context, mask=None):
        calls.append(x.shape[0])
        out = x / (1 + sigma[:, None] ** 2) + context.mean(dim=1)
        return out if mask is None else out * mask

    return denoiser


def guidance_inputs():
    generator = seeded(0)
    x = torch.randn(3, 4, generator=generator)
    sigma = torch.tensor([1.0, 2.0, 3.0])
    context = torch.randn(3, 5, 4, generator=generator)
    uncond_context = torch.randn(3, 5, 4, generator=generator)
    return x, sigma, context, uncond_context


def test_guidance_scale_one_is_the_conditional_prediction():
    x, sigma, context, uncond_context = guidance_inputs()
    calls = []
    denoiser = context_denoiser(calls)
    guided = GuidedDenoiser(denoiser, 1.0)(x, sigma, context=context, uncond_context=uncond_context)
    assert torch.equal(guided, denoiser(x, sigma, context=context))
    assert calls == [3, 3]  # the unconditional half is skipped
    cond, uncond = torch.randn(2, 3, 4, generator=seeded(1))
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)


def test_guidance_scale_zero_is_the_unconditional_prediction():
    x, sigma, context, uncond_context = guidance_inputs()
    calls = []
    denoiser = context_denoiser(calls)
    guided = GuidedDenoiser(denoiser, 0.0)(x, sigma, context=context, uncond_context=uncond_context)
    assert torch.equal(guided, denoiser(x, sigma, context=uncond_context))
    assert calls == [6, 3]  # both halves in one batch


def test_guidance_scale_three_runs_both_halves_in_one_batch():
    x, sigma, context, uncond_context = guidance_inputs()
    calls = []
    denoiser = context_denoiser(calls)
    mask = torch.tensor([[1.0], [0.0], [2.0]])
    guided = GuidedDenoiser(denoiser, 3.0)(x, sigma, context=context, uncond_context=uncond_context, mask=mask)
    assert calls == [6]
    cond = denoiser(x, sigma, context=context, mask=mask)
    uncond = denoiser(x, sigma, context=uncond_context, mask=mask)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-6)
    # One negative prompt shared by the batch.
    shared = GuidedDenoiser(denoiser, 3.0)(x, sigma, context=context, uncond_context=uncond_context[:1])
    uncond_shared = denoiser(x, sigma, context=uncond_context[:1].expand(3, 5, 4))
    assert torch.allclose(shared, 3.0 * denoiser(x, sigma, context=context) - 2.0 * uncond_shared, atol=1e-6)


# ------------------------------------------------------------------------------------------ image-to-image


def test_img2img_full_strength_is_the_full_sampling_start():
    sigmas = get_sigmas(sd_alphas_cumprod(), 20, "karras")
    x0 = torch.randn(2, 4, 8, 8, generator=seeded(0))
    x_start, remaining = img2img_start(x0, sigmas, 1.0, generator=seeded(1))
    assert torch.equal(remaining, sigmas)
    noise = torch.randn(x0.shape, generator=seeded(1))
    assert torch.allclose(x_start, x0 + sigmas[0].float() * noise)


def test_img2img_zero_strength_returns_the_input():
    sigmas = get_sigmas(sd_alphas_cumprod(), 20, "karras")
    x0 = torch.randn(2, 4, 8, 8, generator=seeded(0))
    x_start, remaining = img2img_start(x0, sigmas, 0.0, generator=seeded(1))
    assert remaining.tolist() == [0.0]
    assert torch.equal(x_start, x0)
    assert torch.equal(sample_dpmpp_2m(gaussian_denoiser, x_start, remaining), x0)


def test_img2img_partial_strength_skips_the_first_steps():
    sigmas = get_sigmas(sd_alphas_cumprod(), 20, "karras")
    x0 = torch.zeros(2, 4, 8, 8)
    noise = torch.ones_like(x0)
    x_start, remaining = img2img_start(x0, sigmas, 0.3, noise=noise)
    assert torch.equal(remaining, sigmas[14:])  # 6 of 20 steps remain
    assert torch.allclose(x_start, torch.full_like(x0, sigmas[14].item()))
    with pytest.raises(ConfigError, match="strength"):
        img2img_start(x0, sigmas, 1.5, noise=noise)
