"""The first stage as a TrainingStage (see launch/runtime/stage.py): modules, parameter groups, losses.

Runtime contract, in short:
  trainable_modules(): {"autoencoder": Autoencoder, "discriminator": PatchDiscriminator}, in that
    order; the discriminator only when loss.disc_weight > 0 (and disc_factor > 0).
  main_module = "autoencoder": EMA, previews, exports and latent statistics use it.
  training_step(nets, batch, step): `nets` are the runtime's wrappers (DeepSpeed engines); we
    call them for forward passes. `nets["autoencoder"].module` (unwrapped, see `unwrap`) is
    read only for the decoder's last-layer weight of the adaptive GAN weight, which needs
    full (unpartitioned) parameters: ZeRO stage <= 2, or set loss.adaptive_weight=false.
  Returned losses: "autoencoder" every micro-step it trains, "discriminator" only once it
    trains (step >= disc_start - disc_warmup_steps); a missing name does not step.
  `step` = optimizer steps of the autoencoder (generator), which gates the GAN.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from .config import AutoencoderConfig, AutoencoderLossConfig
from .discriminator import build_discriminator
from .loss import AutoencoderLoss
from .metrics import psnr, ssim
from .model import Autoencoder, build_autoencoder
from .perceptual import build_perceptual
from .quantize import set_collectives


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module inside a DeepSpeed engine / DDP (`.module`) or torch.compile (`_orig_mod`)."""
    while True:
        inner = getattr(net, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def _dtype_of(net: nn.Module) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return torch.float32


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad inside the block (so a graph built there leaves them no
    gradient), and get their previous flags back afterwards."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class AutoencoderStage:
    main_module = "autoencoder"

    def __init__(self, autoencoder: AutoencoderConfig, loss: AutoencoderLossConfig,
                 perceptual: Optional[nn.Module] = None, build_lpips: bool = True):
        self.autoencoder_config, self.loss_config = autoencoder, loss
        self.autoencoder: Autoencoder = build_autoencoder(autoencoder)
        if loss.learn_logvar:   # lives in the autoencoder so its engine optimises it (and ZeRO sees it)
            self.autoencoder.logvar = nn.Parameter(torch.tensor(float(loss.logvar_init)))
        self.discriminator = build_discriminator(loss, autoencoder.out_channels) if loss.use_discriminator else None
        if perceptual is None and build_lpips:
            perceptual = build_perceptual(loss)
        self.loss = AutoencoderLoss(loss, autoencoder.regularizer, perceptual)
        # The input of the decoder's last conv, for the adaptive GAN weight (see AutoencoderLoss.generator_loss).
        self._last_features: dict[str, torch.Tensor] = {}
        if self.discriminator is not None:
            self.autoencoder.decoder.conv_out.register_forward_hook(self._keep_last_features)
        self._alternate = 0   # micro-step parity for gan_steps = "alternating" (restarts at 0 on resume)

    def _keep_last_features(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self._last_features["x"] = inputs[0].detach()

    @classmethod
    def from_config(cls, cfg) -> "AutoencoderStage":
        """From a root config with `.autoencoder` and `.loss` sections."""
        return cls(cfg.autoencoder, cfg.loss)

    # ------------------------------------------------------------------ protocol: modules
    def trainable_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"autoencoder": self.autoencoder}
        if self.discriminator is not None:
            mods["discriminator"] = self.discriminator
        return mods

    def param_groups(self, name: str) -> list[dict]:
        """Weights decay; biases, norm scales, the codebook and logvar do not. The discriminator
        group carries loss.disc_lr as an absolute "lr" when set."""
        module = self.trainable_modules()[name]
        decay, no_decay = [], []
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or pname.startswith("quantize.") or pname == "logvar":
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if name == "discriminator" and self.loss_config.disc_lr is not None:
            for g in groups:
                g["lr"] = self.loss_config.disc_lr
        return groups

    def setup(self, device: torch.device) -> None:
        self.loss.to(device)

    def latent_statistics(self, main: nn.Module, batches: Iterable) -> dict[str, float]:
        """scaling_factor / shift_factor (and raw mean, std, count) over `latent_stats_batches` batches."""
        return latent_statistics(main, batches, num_batches=self.autoencoder_config.latent_stats_batches).as_dict()

    def set_collectives(self, all_reduce_sum=None, broadcast=None) -> int:
        """Install rank collectives for VQ/FSQ state updated in forward (see quantize.py)."""
        return set_collectives(self.autoencoder, all_reduce_sum, broadcast)

    # ------------------------------------------------------------------ protocol: training
    def phase(self, step: int) -> tuple[bool, bool]:
        """(generator trains, discriminator trains) for this micro-step."""
        d_on = self.discriminator is not None and self.loss.disc_active(step)
        if not d_on:
            return True, False
        if self.loss_config.gan_steps == "joint":
            return True, True
        g_turn = self._alternate % 2 == 0
        self._alternate += 1
        return g_turn, not g_turn

    def training_step(self, nets: Mapping[str, nn.Module], batch: dict, step: int
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | float]]:
        x = batch["image"]
        ae = nets["autoencoder"]
        disc = nets.get("discriminator")
        g_on, d_on = self.phase(step)
        if d_on and disc is None:
            raise KeyError("training_step: the discriminator trains from this step but nets has no 'discriminator'")
        xin = x.to(_dtype_of(ae))
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor | float] = {}
        if g_on:
            out = ae(xin, sample=True)
            use_gan = disc is not None and self.loss.gan_active(step)
            # D is frozen for the generator's loss and called as the plain module: a runtime wrapper
            # (a DeepSpeed engine) would treat the side backward through it as its own backward pass.
            d_plain = unwrap(disc) if use_gan else None
            with frozen(d_plain) if use_gan else contextlib.nullcontext():
                g = self.loss.generator_loss(x, out, step, d_plain, self.autoencoder.decoder.conv_out,
                                             self._last_features.pop("x", None))
            losses["autoencoder"] = g.loss
            logs.update(g.logs)
            recon = out["reconstruction"]
        else:   # discriminator's turn: fresh reconstructions, no generator graph, no quantizer updates
            with torch.no_grad():
                recon = ae(xin, sample=True, update=False)["reconstruction"]
        if d_on:
            d = self.loss.discriminator_loss(x, recon.detach(), disc)
            losses["discriminator"] = d.loss
            logs.update(d.logs)
        return losses, logs

    # ------------------------------------------------------------------ protocol: evaluation
    @torch.no_grad()
    def validation_step(self, nets: Mapping[str, nn.Module], batch: dict, seed: int) -> dict[str, float]:
        """L1, PSNR, SSIM (and LPIPS when real) of deterministic reconstructions (posterior mode)."""
        ae = nets["autoencoder"]
        x = batch["image"]
        out = ae(x.to(_dtype_of(ae)), sample=False, update=False)
        xr = out["reconstruction"].float().clamp(-1, 1)
        x = x.float()
        res = {"l1": (x - xr).abs().mean().item(), "psnr": psnr(x, xr).mean().item(),
               "ssim": ssim(x, xr).mean().item()}
        p = self.loss.perceptual
        if p is not None and getattr(p, "is_real", False):
            res["lpips"] = p(xr, x).mean().item()
        if "kl" in out:
            res["kl"] = out["kl"].float().mean().item()
        if "reg_loss" in out:
            res["codebook"] = out["reg_loss"].float().item()
        return res

    @torch.no_grad()
    def preview(self, main: nn.Module, batch: dict, seed: int) -> torch.Tensor:
        """[N, 3, H, 2W] in [-1, 1]: each input with its reconstruction (posterior mode) to its right."""
        x = batch["image"]
        out = main(x.to(_dtype_of(main)), sample=False, update=False)
        xr = out["reconstruction"].float().clamp(-1, 1)
        return torch.cat([x.float().clamp(-1, 1), xr], dim=-1)


@dataclass
class LatentStats:
    mean: float
    std: float
    count: int

    @property
    def scaling_factor(self) -> float:
        return 1.0 / self.std

    @property
    def shift_factor(self) -> float:
        return self.mean

    def as_dict(self) -> dict[str, float]:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latent_mean": self.mean, "latent_std": self.std, "latent_count": self.count}


@torch.no_grad()
def latent_statistics(model: nn.Module, batches: Iterable, num_batches: Optional[int] = None,
                      sample: bool = True, seed: int = 0) -> LatentStats:
    """Mean and std of the latents over (up to) `num_batches` image batches, over all elements.

    The diffusion stage trains on (z - shift_factor) * scaling_factor, with
    scaling_factor = 1/std and shift_factor = mean. KL: posterior samples by default (what the
    denoiser sees; `sample=False` uses the mode). VQ/FSQ: the quantized latents.
    Accepts tensors or batch dicts with "image"; accumulates in float64.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    gen = None
    total = 0
    s = s2 = None
    try:
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            x = batch["image"] if isinstance(batch, dict) else batch
            dev = next(model.parameters()).device
            x = x.to(dev, _dtype_of(model))
            if gen is None:
                gen = torch.Generator(device=dev).manual_seed(seed)
            enc = model.encode(x)
            if isinstance(enc, tuple):
                z = enc[0]
            else:
                z = enc.sample(gen) if sample else enc.mode()
            z = z.double()
            s = z.sum() if s is None else s + z.sum()
            s2 = z.pow(2).sum() if s2 is None else s2 + z.pow(2).sum()
            total += z.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("latent_statistics: no batches")
    mean = (s / total).item()
    var = max((s2 / total).item() - mean ** 2, 0.0)
    return LatentStats(mean=mean, std=var ** 0.5 if var > 0 else 1.0, count=total)
