"""First-stage objective: reconstruction (L1 [+ L2] + LPIPS) as a Laplace-style NLL, the
regulariser (KL or codebook), and a PatchGAN term balanced by the adaptive weight.

Scale convention: LDM's KL objective sums every term over each sample's pixel values and
averages over the batch. We divide those sums by the number of pixel values (C*H*W): relative
weights (kl_weight 1e-6, disc_weight 0.5, ...) keep their LDM meaning while the loss is O(1),
which keeps gradient clipping and fp16 loss scaling sane. The VQ objective (taming) already
uses means, and so do we.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderLossConfig
from .metrics import psnr


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


@dataclass
class LossOutput:
    loss: torch.Tensor                                    # what the optimizer minimises
    logs: dict[str, torch.Tensor] = field(default_factory=dict)   # detached scalars
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted summands, with graph


class AutoencoderLoss(nn.Module):
    """Owns the frozen LPIPS; the discriminator is passed in (it is a trainable module/engine)."""

    def __init__(self, cfg: AutoencoderLossConfig, regularizer: str, perceptual: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.regularizer = regularizer
        self.perceptual = perceptual
        self.perceptual_name = "lpips" if getattr(perceptual, "is_real", False) else "perceptual_random"

    # ------------------------------------------------------------------ schedule (in generator steps)
    def gan_active(self, step: int) -> bool:
        """The GAN term enters the generator's loss from `disc_start` on."""
        return self.cfg.use_discriminator and step >= self.cfg.disc_start

    def disc_active(self, step: int) -> bool:
        """The discriminator trains from `disc_start - disc_warmup_steps` on."""
        return self.cfg.use_discriminator and step >= self.cfg.disc_start - self.cfg.disc_warmup_steps

    # ------------------------------------------------------------------ pieces
    def generator_adversarial(self, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.cfg.disc_loss == "hinge":
            return -logits_fake.float().mean()
        return F.softplus(-logits_fake.float()).mean()   # non-saturating

    def discriminator_objective(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        fn = hinge_d_loss if self.cfg.disc_loss == "hinge" else vanilla_d_loss
        return fn(logits_real.float(), logits_fake.float())

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: Optional[torch.Tensor]
                        ) -> torch.Tensor:
        """disc_weight * |d nll / dW| / |d g_loss / dW| at the decoder's last layer W.

        Gradients are taken with autograd.grad (nothing accumulates in .grad), norms in fp32,
        clamped to [0, adaptive_weight_max]; a non-finite ratio (overflow under low precision)
        falls back to 0 so one bad step cannot poison the generator.
        """
        if not self.cfg.adaptive_weight:
            return nll.new_tensor(self.cfg.disc_weight, dtype=torch.float32)
        if last_layer is None or not torch.is_grad_enabled() or not g_loss.requires_grad:
            return nll.new_zeros((), dtype=torch.float32)
        g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        ratio = g_nll.float().norm() / (g_gan.float().norm() + 1e-4)
        ratio = torch.where(torch.isfinite(ratio), ratio.clamp(0.0, self.cfg.adaptive_weight_max),
                            torch.zeros_like(ratio))
        return (ratio * self.cfg.disc_weight).detach()

    def _fake_logits(self, disc: Callable, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        dtype = _dtype_of(disc) if isinstance(disc, nn.Module) else fake.dtype
        if self.cfg.disc_norm == "batch":   # BatchNorm must see the mixed batch it is trained on
            return disc(torch.cat([real.detach(), fake]).to(dtype)).chunk(2)[1]
        return disc(fake.to(dtype))

    # ------------------------------------------------------------------ generator
    def generator_loss(self, inputs: torch.Tensor, out: dict[str, torch.Tensor], step: int,
                       disc: Optional[Callable] = None, last_layer: Optional[torch.Tensor] = None) -> LossOutput:
        """Loss of the autoencoder for one batch. `out` is Autoencoder.forward's dict; `disc` the
        discriminator (called, with its parameters frozen by the caller); `last_layer` is
        decoder.conv_out.weight for the adaptive weight."""
        cfg = self.cfg
        x = inputs.float()
        xr = out["reconstruction"].float()
        per_pixel = x[0].numel()
        logs: dict[str, torch.Tensor] = {}
        terms: dict[str, torch.Tensor] = {}

        diff = x - xr
        l1 = diff.abs().flatten(1).mean(1)                           # [B]
        rec = cfg.l1_weight * l1
        logs["l1"] = l1.mean().detach()
        if cfg.l2_weight > 0:
            l2 = diff.pow(2).flatten(1).mean(1)
            rec = rec + cfg.l2_weight * l2
            logs["l2"] = l2.mean().detach()
        p = None
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p = self.perceptual(xr, x).float()                       # [B]; gradient flows into xr
            rec = rec + cfg.perceptual_weight * p
            logs[self.perceptual_name] = p.mean().detach()

        logvar = out.get("logvar")
        logvar = x.new_tensor(cfg.logvar_init) if logvar is None else logvar.float()
        inv_var = torch.exp(-logvar)
        nll = (rec * inv_var + logvar).mean()
        terms["l1"] = (cfg.l1_weight * l1 * inv_var).mean()
        if p is not None:
            terms["perceptual"] = (cfg.perceptual_weight * p * inv_var).mean()
        logs["rec_loss"] = rec.mean().detach()
        logs["nll"] = nll.detach()
        logs["logvar"] = logvar.detach()
        loss = nll

        if self.regularizer == "kl":
            kl = out["kl"].float()                                   # per-sample sums over the latent
            reg = cfg.kl_weight * (kl / per_pixel).mean()
            terms["kl"] = reg
            logs["kl"] = kl.mean().detach()
        else:
            reg = cfg.codebook_weight * out["reg_loss"].float()
            terms["codebook"] = reg
            logs["codebook"] = out["reg_loss"].detach().float()
            for k in ("usage", "perplexity", "batch_perplexity", "commitment_loss"):
                if k in out:
                    logs[k] = out[k].detach().float()
        loss = loss + reg

        if disc is not None and self.gan_active(step):
            logits_fake = self._fake_logits(disc, inputs, out["reconstruction"])
            g_loss = self.generator_adversarial(logits_fake)
            d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            gan = d_weight * cfg.disc_factor * g_loss
            terms["gan"] = gan
            loss = loss + gan
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight, logits_fake_g=logits_fake.detach().float().mean())
        logs["psnr"] = psnr(x.detach(), xr.detach().clamp(-1, 1)).mean()
        logs["loss"] = loss.detach()
        return LossOutput(loss, logs, terms)

    # ------------------------------------------------------------------ discriminator
    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, disc: Callable) -> LossOutput:
        """Loss of the discriminator on real inputs and detached reconstructions, one call on the
        concatenated batch (so BatchNorm, if chosen, normalises real and fake together)."""
        dtype = _dtype_of(disc) if isinstance(disc, nn.Module) else inputs.dtype
        both = torch.cat([inputs.detach(), reconstructions.detach()]).to(dtype)
        logits_real, logits_fake = disc(both).chunk(2)
        d = self.discriminator_objective(logits_real, logits_fake)
        loss = self.cfg.disc_factor * d
        logs = {"disc_loss": d.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        return LossOutput(loss, logs, {"disc": loss})
