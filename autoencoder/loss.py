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


def _carry(y: torch.Tensor, grad_y: torch.Tensor, value) -> torch.Tensor:
    """A scalar whose value is `value` and whose gradient with respect to `y` is `grad_y`."""
    t = (y * grad_y.to(y.dtype)).sum()
    return t - t.detach() + value


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

    def adaptive_weight(self, g_nll: torch.Tensor, g_gan: torch.Tensor) -> torch.Tensor:
        """disc_weight * |d nll / dW| / |d g_loss / dW| from the two gradients at the decoder's last
        layer W, in fp32, clamped to [0, adaptive_weight_max]; a non-finite ratio (overflow under low
        precision) falls back to 0 so one bad step cannot poison the generator."""
        if not self.cfg.adaptive_weight:
            return g_nll.new_tensor(self.cfg.disc_weight, dtype=torch.float32)
        ratio = g_nll.float().norm() / (g_gan.float().norm() + 1e-4)
        ratio = torch.where(torch.isfinite(ratio), ratio.clamp(0.0, self.cfg.adaptive_weight_max),
                            torch.zeros_like(ratio))
        return (ratio * self.cfg.disc_weight).detach()

    @staticmethod
    def last_layer_grad(features: torch.Tensor, conv: nn.Conv2d, grad_output: torch.Tensor) -> torch.Tensor:
        """dL/dW of the last conv from its input and dL/d(its output): what autograd.grad(L, W) gives,
        without a second backward through the decoder (see generator_loss)."""
        w = conv.weight
        shape = tuple(getattr(w, "ds_shape", w.shape))   # ZeRO-3 keeps only a partition in .weight
        return torch.nn.grad.conv2d_weight(features.float(), shape, grad_output.float(), stride=conv.stride,
                                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def _fake_logits(self, disc: Callable, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        dtype = _dtype_of(disc) if isinstance(disc, nn.Module) else fake.dtype
        if self.cfg.disc_norm == "batch":   # BatchNorm must see the mixed batch it is trained on
            return disc(torch.cat([real.detach(), fake]).to(dtype)).chunk(2)[1]
        return disc(fake.to(dtype))

    # ------------------------------------------------------------------ generator
    def generator_loss(self, inputs: torch.Tensor, out: dict[str, torch.Tensor], step: int,
                       disc: Optional[Callable] = None, last_layer: Optional[nn.Conv2d] = None,
                       features: Optional[torch.Tensor] = None) -> LossOutput:
        """Loss of the autoencoder for one batch. `out` is Autoencoder.forward's dict; `disc` the
        discriminator (called, with its parameters frozen by the caller); `last_layer` is the
        decoder's last conv and `features` its input, for the adaptive GAN weight.

        The adaptive weight needs the gradients of the NLL and of the GAN term at the last layer's
        weight W. LDM takes them with two autograd.grad calls through the whole graph; under
        ZeRO-2/3 a backward through the engine's module outside engine.backward runs DeepSpeed's
        gradient-reduction hooks, and it walks LPIPS and D three times. Instead both terms are
        evaluated on a detached copy y' of the reconstruction: two cheap backwards reach y' only
        (through LPIPS / D, never the autoencoder), dL/dW follows exactly from the conv's input and
        dL/dy' (`last_layer_grad`), and the autoencoder receives dL/dy through one surrogate term
        whose value is the true loss. Gradients are identical to differentiating the total loss.
        """
        cfg = self.cfg
        x = inputs.float()
        y = out["reconstruction"]
        side = disc is not None and self.gan_active(step) and cfg.adaptive_weight and torch.is_grad_enabled()
        if side and (last_layer is None or features is None):
            raise ValueError("generator_loss: the adaptive weight needs last_layer and features")
        xr = y.detach().float().requires_grad_(True) if side else y.float()
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

        if disc is not None and self.gan_active(step):
            logits_fake = self._fake_logits(disc, inputs, xr)
            g_loss = self.generator_adversarial(logits_fake)
            logs.update(g_loss=g_loss.detach(), logits_fake_g=logits_fake.detach().float().mean())
            if side:
                gy_nll, = torch.autograd.grad(nll, xr, retain_graph=True)
                gy_gan, = torch.autograd.grad(g_loss, xr)
                d_weight = self.adaptive_weight(self.last_layer_grad(features, last_layer, gy_nll),
                                                self.last_layer_grad(features, last_layer, gy_gan))
                scale = d_weight * cfg.disc_factor
                if out.get("logvar") is not None:   # a learned logvar: its own gradient, rec held fixed
                    nll_term = _carry(y, gy_nll, 0.0) + (rec.detach() * inv_var + logvar).mean()
                else:
                    nll_term = _carry(y, gy_nll, nll.detach())
                gan = _carry(y, scale * gy_gan, (scale * g_loss).detach())
                terms = {"nll": nll_term}            # per-term graphs are not kept on this path
                main = nll_term + gan
            else:
                d_weight = self.adaptive_weight(nll.detach(), nll.detach())   # fixed weight (adaptive off)
                gan = d_weight * cfg.disc_factor * g_loss
                main = nll + gan
            terms["gan"] = gan
            logs["d_weight"] = d_weight
        else:
            main = nll
        loss = main + reg
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
