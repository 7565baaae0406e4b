"""The KL autoencoder's posterior: a diagonal Gaussian over the latent."""
from __future__ import annotations

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0   # keeps exp(logvar) finite in fp32 (and the KL bounded)


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element, built from `params` = cat([mean, logvar], dim=1)."""

    def __init__(self, params: torch.Tensor, deterministic: bool = False):
        self.params = params
        self.mean, logvar = params.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:   # a point mass: sample() == mode(), kl() == 0
            self.logvar = torch.full_like(self.mean, LOGVAR_MIN)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over each sample's latent elements: shape [B]."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        mean, logvar = self.mean.float(), self.logvar.float()   # a sum of thousands of terms: fp32
        terms = mean.pow(2) + logvar.exp() - 1.0 - logvar
        return 0.5 * terms.flatten(1).sum(dim=1)

    def nll(self, value: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `value` summed per sample: shape [B]."""
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=value.dtype, device=value.device))
        terms = log_two_pi + self.logvar + (value - self.mean).pow(2) / self.var
        return 0.5 * terms.flatten(1).sum(dim=1)
