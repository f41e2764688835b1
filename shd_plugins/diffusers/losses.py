"""DiT's diffusion process and training loss, for diffusers DiTs (Peebles & Xie, 2023).

diffusers has the schedulers and the models but not DiT's training objective: eps MSE plus, for learned-sigma
models (``out_channels == 2 * in_channels``), the variational bound on the variance channels with the predicted
mean detached (Nichol & Dhariwal's hybrid loss, DiT's ``GaussianDiffusion.training_losses``). DiT also drops each
class label once per sample for classifier-free guidance. This module holds those pieces so a training loop (ours in
``recipes/train_dit.py``, or a user's) imports them instead of copying them, as diffusers' ``training_utils.py`` does
for its examples.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

__all__ = ['LearnedSigmaVLB', 'default_dit_scheduler', 'dit_diffusion_loss', 'drop_class_labels']


def default_dit_scheduler(variance_type: str = 'fixed_small') -> DDPMScheduler:
    """DDPM with DiT's training schedule: 1000 steps, linear betas 1e-4..0.02, eps prediction, no x0 clipping.

    The one default schedule of the package: training draws timesteps from it, a model folder without
    ``scheduler/`` samples with it.

    Args:
        variance_type: ``'fixed_small'`` (what ``DiTPipeline`` can sample), or ``'learned_range'`` to sample a
            learned-sigma model with its predicted variance (DiT's own sampler).
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule='linear',
        clip_sample=False,
        prediction_type='epsilon',
        variance_type=variance_type,
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(
        x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM/DiT ``discretized_gaussian_log_likelihood``)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class LearnedSigmaVLB:
    """DiT's variational-bound term for learned-range variances (``GaussianDiffusion._vb_terms_bpd``).

    DiT's ``training_losses`` with ``LEARNED_RANGE`` variance adds this term to the eps MSE, feeding it the predicted
    eps *detached*, so the bound trains only the variance channels (Nichol & Dhariwal's hybrid loss). Returns bits
    per dimension for each sample: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL at t = 0.
    Schedule constants are computed in float64 from the scheduler's betas, as DiT does.

    Args:
        betas: The training scheduler's betas (``scheduler.betas``).
    """

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.tables = {
            'posterior_log_variance_clipped': torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            'log_betas': torch.log(betas),
            'posterior_mean_coef1': betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            'posterior_mean_coef2': (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
            'sqrt_recip_alphas_cumprod': torch.sqrt(1.0 / alphas_cumprod),
            'sqrt_recipm1_alphas_cumprod': torch.sqrt(1.0 / alphas_cumprod - 1.0),
        }
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        tables = self._device_tables.get(t.device)
        if tables is None:
            tables = {k: v.float().to(t.device) for k, v in self.tables.items()}
            self._device_tables[t.device] = tables
        return tables[name][t].view(-1, *([1] * (ndim - 1)))

    def __call__(self, eps: torch.Tensor, var_values: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """Bits per dimension of each sample (B,), in float32.

        Args:
            eps: Predicted noise (detach it to train only the variance, as DiT).
            var_values: The model's variance channels in [-1, 1] (interpolation between beta_t and the posterior's).
            x_start: Clean latents x_0.
            x_t: Noisy latents at ``t``.
            t: Integer timesteps (B,).
        """
        eps, var_values, x_start, x_t = eps.float(), var_values.float(), x_start.float(), x_t.float()
        ex = lambda name: self._extract(name, t, x_t.ndim)  # noqa: E731
        coef1, coef2 = ex('posterior_mean_coef1'), ex('posterior_mean_coef2')
        true_mean = coef1 * x_start + coef2 * x_t
        true_log_variance = ex('posterior_log_variance_clipped')
        # p(x_{t-1} | x_t): the variance interpolates (in log space) between the posterior's and beta_t.
        frac = (var_values + 1.0) / 2.0
        model_log_variance = frac * ex('log_betas') + (1.0 - frac) * true_log_variance
        pred_x_start = ex('sqrt_recip_alphas_cumprod') * x_t - ex('sqrt_recipm1_alphas_cumprod') * eps
        model_mean = coef1 * pred_x_start + coef2 * x_t

        kl = 0.5 * (-1.0 + model_log_variance - true_log_variance + torch.exp(true_log_variance - model_log_variance)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance))
        kl = kl.mean(dim=tuple(range(1, kl.ndim))) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
        nll = nll.mean(dim=tuple(range(1, nll.ndim))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def dit_diffusion_loss(
        model_output: torch.Tensor,
        noise: torch.Tensor,
        *,
        vlb: LearnedSigmaVLB | None = None,
        latents: torch.Tensor | None = None,
        noisy_latents: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """DiT's training loss of one batch, as float32 terms: ``{'mse', 'diffusion_loss'}`` and ``'vb'`` with ``vlb``.

    ``mse`` compares the eps channels (the first ``noise.shape[1]``) with the noise. With ``vlb`` (learned-sigma
    models) the variational bound is added on the variance channels, the eps detached so that the bound trains the
    variance only, as DiT's hybrid loss.

    Args:
        model_output: The model's prediction (B, C or 2C, H, W).
        noise: The noise added to ``latents`` (B, C, H, W).
        vlb: The bound of the training schedule; None for fixed-variance models.
        latents: Clean latents x_0 (needed with ``vlb``).
        noisy_latents: x_t (needed with ``vlb``).
        timesteps: Integer timesteps (needed with ``vlb``).
    """
    channels = noise.shape[1]
    eps = model_output[:, :channels]
    terms = {'mse': F.mse_loss(eps.float(), noise.float())}
    diffusion_loss = terms['mse']
    if vlb is not None:
        if latents is None or noisy_latents is None or timesteps is None:
            raise ValueError('The learned-sigma bound needs latents, noisy_latents and timesteps.')
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f'The learned-sigma bound needs eps and variance channels (2 x {channels}); the model output has '
                f'{model_output.shape[1]} channels.')
        variance = model_output[:, channels:]  # the bound trains the variance only: eps is detached
        terms['vb'] = vlb(eps.detach(), variance, latents, noisy_latents, timesteps).mean()
        diffusion_loss = diffusion_loss + terms['vb']
    terms['diffusion_loss'] = diffusion_loss
    return terms


def drop_class_labels(labels: torch.Tensor, prob: float, null_class: int) -> torch.Tensor:
    """DiT's label dropout: each label becomes the null class (``num_embeds_ada_norm``) with probability ``prob``.

    Drop once per sample and give the same labels to teacher and student, so both see the same condition.
    """
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape[0], device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)
