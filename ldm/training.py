"""Stage two as a `launch/runtime/stage.py` TrainingStage: a text-conditioned denoiser trained on latents.

Batches (docs/CONTRIBUTING.md), either kind, in any mix of keys:
- raw: `image` [B,3,H,W] in [-1,1] is encoded online by the frozen autoencoder passed in;
- precomputed: `latent_mean` (+ `latent_std`) [B,C,h,w] are the autoencoder's raw posterior. Flips are the
  data loader's: it picks a sample's mirrored latents with data.flip_prob, together with the swapped caption's
  text (data.mirror_captions), so a batch carries one of each; a batch with `*_flip` partners is refused;
- text: `text_hidden`, `text_mask`, `text_pooled` if precomputed, else `caption` through the frozen
  open_clip encoder. Either way the same keys come out, so both sources are interchangeable.
Latents given to the denoiser: (posterior sample (mean + std * noise) - shift_factor) * scaling_factor.
Condition dropout (CFG) is drawn here, per sample, at every training step.
"""
from __future__ import annotations

import dataclasses

from typing import Mapping, Optional

import torch
from torch import nn

from .conditioning import apply_condition_dropout, unconditional_like
from .config import (ConditioningConfig, DenoiserConfig, LatentConfig, SamplingConfig)
from .dit import DiT
from .guidance import guided
from .mmdit import MMDiT
from .objectives import Objective, build_objective
from .samplers import sample
from .unet import UNet

VALIDATION_UNIT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)   # fixed noise levels of validation_step (u = 1: noise)
_NO_DECAY_NAMES = ("null_context", "null_pooled", "pos_embed", "scale_shift_table", "label_embed")


def build_denoiser(cfg: DenoiserConfig) -> nn.Module:
    """DenoiserConfig -> UNet, DiT or MMDiT. Allocation only, so it works under `with torch.device("meta"):`."""
    if cfg.kind == "unet":
        return UNet(cfg.unet, cfg.pooled_dim, cfg.learned_null_tokens, cfg.attention_backend)
    if cfg.kind == "dit":
        return DiT(cfg.dit, cfg.pooled_dim, cfg.learned_null_tokens, cfg.attention_backend)
    if cfg.kind == "mmdit":
        return MMDiT(cfg.mmdit, cfg.pooled_dim, cfg.learned_null_tokens, cfg.attention_backend)
    raise ValueError(f"denoiser.kind {cfg.kind!r}: expected 'unet', 'dit' or 'mmdit'")


def build_denoiser_for(cfg) -> nn.Module:
    """The root config's denoiser, with LoRA adapters (base frozen) when `lora.rank` > 0."""
    net = build_denoiser(cfg.denoiser)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.rank > 0:
        from .lora import inject
        inject(net, lora, cfg.denoiser.kind)
    return net


def latent_shape(cfg: DenoiserConfig) -> tuple[int, int, int]:
    if cfg.kind == "unet":
        return cfg.unet.in_channels, cfg.unet.sample_size, cfg.unet.sample_size
    if cfg.kind == "mmdit":
        return cfg.mmdit.in_channels, cfg.mmdit.input_size, cfg.mmdit.input_size
    return cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size


def _freeze(module: Optional[nn.Module]) -> Optional[nn.Module]:
    if module is not None:
        module.requires_grad_(False)
        module.eval()
    return module


def _posterior_sample(posterior, generator: Optional[torch.Generator], sample_posterior: bool) -> torch.Tensor:
    """Duck-typed first-stage output: a tensor, a (quantized z, info) pair (VQ / FSQ: deterministic, the
    latents `ldm data precompute` stores too), or a posterior with mean/std (KL) or mode()/sample()."""
    if isinstance(posterior, tuple) and posterior and torch.is_tensor(posterior[0]):
        return posterior[0]
    if torch.is_tensor(posterior):
        return posterior
    mean = getattr(posterior, "mean", None)
    if torch.is_tensor(mean):
        std = getattr(posterior, "std", None)
        if not sample_posterior or std is None:
            return mean
        return mean + std * _randn(mean, generator)
    if sample_posterior and hasattr(posterior, "sample") and generator is None:
        return posterior.sample()
    if hasattr(posterior, "mode"):
        return posterior.mode()
    raise TypeError(f"cannot take latents from autoencoder output of type {type(posterior).__name__}")


def _randn(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=dev, dtype=torch.float32).to(like.device, like.dtype)


class DiffusionStage:
    main_module = "denoiser"

    def __init__(self, denoiser: nn.Module, objective: Objective, *, text_encoder: Optional[nn.Module] = None,
                 autoencoder: Optional[nn.Module] = None, conditioning: ConditioningConfig = ConditioningConfig(),
                 latents: LatentConfig = LatentConfig(), sampling: SamplingConfig = SamplingConfig(),
                 use_pooled: bool = False, latent_shape: Optional[tuple[int, int, int]] = None,
                 empty_condition: Optional[Mapping[str, torch.Tensor]] = None):
        """`text_encoder`: callable captions -> {text_hidden, text_mask, text_pooled} (ldm.text); optional when
        batches carry precomputed text, but then `empty_condition` (the encoded empty prompt, batch 1)
        is needed for conditioning.null_embedding 'empty'. `autoencoder`: frozen module with encode(x) -> posterior
        and decode(z); needed for raw images and to decode previews."""
        self.denoiser = denoiser
        self.objective = objective
        self.text_encoder = _freeze(text_encoder)
        self.autoencoder = _freeze(autoencoder)
        if latents.scaling_factor is None or latents.shift_factor is None:
            # unset: the runtime fills them from the autoencoder export; alone, latents are used as they come
            latents = dataclasses.replace(latents, scaling_factor=latents.scaling_factor or 1.0,
                                          shift_factor=latents.shift_factor or 0.0)
        self.conditioning, self.latents, self.sampling = conditioning, latents, sampling
        self.use_pooled = use_pooled
        self.latent_shape = latent_shape
        self._empty = dict(empty_condition) if empty_condition is not None else None
        self.device = next(denoiser.parameters()).device
        if conditioning.null_embedding == "learned" and getattr(denoiser, "null_context", None) is None:
            raise ValueError("conditioning.null_embedding is 'learned' but the denoiser has no learned null "
                             "caption: set denoiser.learned_null_tokens to the text length (77 for open_clip)")

    @classmethod
    def from_config(cls, cfg, *, autoencoder: Optional[nn.Module] = None,
                    text_encoder: Optional[nn.Module] = None, build_text_encoder: bool = True,
                    empty_condition: Optional[Mapping[str, torch.Tensor]] = None) -> "DiffusionStage":
        """Build from a root config (attributes denoiser, text_encoder, objective, conditioning, latents,
        sampling). The text encoder is built through open_clip unless one is given or disabled."""
        if text_encoder is None and build_text_encoder:
            from .text_encoders import build_text_encoders
            text_encoder = build_text_encoders(cfg)      # text.encoders, or the single text_encoder section
        if text_encoder is not None and cfg.conditioning.null_embedding == "learned":
            length = getattr(text_encoder, "context_length", None)
            if length is not None and cfg.denoiser.learned_null_tokens != length:
                raise ValueError(f"denoiser.learned_null_tokens = {cfg.denoiser.learned_null_tokens} but the text "
                                 f"encoder produces {length} tokens")
        return cls(build_denoiser_for(cfg), build_objective(cfg.objective), text_encoder=text_encoder,
                   autoencoder=autoencoder, conditioning=cfg.conditioning, latents=cfg.latents,
                   sampling=cfg.sampling, use_pooled=cfg.denoiser.pooled_dim > 0,
                   latent_shape=latent_shape(cfg.denoiser), empty_condition=empty_condition)

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def param_groups(self, name: str) -> list[dict]:
        """Weight decay on matrices only; biases, norms, embeddings tables, null captions and modulation
        tables get none."""
        if name != "denoiser":
            raise KeyError(f"no trainable module {name!r}")
        decay, no_decay = [], []
        for pname, p in self.denoiser.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or any(key in pname for key in _NO_DECAY_NAMES):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def setup(self, device: torch.device) -> None:
        self.device = torch.device(device)
        for module in (self.text_encoder, self.autoencoder):
            if module is not None:
                module.to(self.device)
        if self._empty is None and self.text_encoder is not None:
            self._empty = self.text_encoder([""])
        if self._empty is not None:
            self._empty = {k: v.to(self.device) for k, v in self._empty.items()}

    def model_fn(self, net: nn.Module):
        """The sampler-facing denoiser: (x, native t, cond) -> prediction (see ldm/samplers.py)."""
        channels = self.latent_shape[0] if self.latent_shape else None

        def fn(x, t, cond):
            out = net(x, self.objective.net_time(t), **cond)
            return out[:, :channels] if channels else out   # drop DiT's learn_sigma channels
        return fn

    def training_step(self, nets: Mapping[str, nn.Module], batch: dict, step: int):
        net = nets[self.main_module]
        z = self.encode_latents(batch)
        cond = self.condition(batch, train=True)
        drop_rate = 0.0
        if self.conditioning.dropout_prob > 0:
            cond, drop = apply_condition_dropout(cond, self.conditioning.dropout_prob,
                                                 self.conditioning.null_embedding, self._empty_cond())
            drop_rate = drop.float().mean()
        inputs = self.objective.training_inputs(z)
        pred = self.model_fn(net)(inputs.x_t, inputs.t, cond)
        loss = self.objective.loss(pred, inputs.target, inputs.weight)
        logs = {"loss": loss.detach(), "t_mean": self.objective.unit_time(inputs.t).mean(),
                "cond_drop": drop_rate}
        if hasattr(self.objective, "shift_for"):
            logs["t_shift"] = self.objective.shift_for(tuple(z.shape[-2:]))
        return {"denoiser": loss}, logs

    @torch.no_grad()
    def validation_step(self, nets: Mapping[str, nn.Module], batch: dict, seed: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(int(seed))
        fn = self.model_fn(nets[self.main_module])
        z = self.encode_latents(batch, generator=g)
        cond = self.condition(batch)
        out = {}
        for u in VALIDATION_UNIT_TIMES:
            t = self.objective.from_unit_time(torch.full((z.shape[0],), u, device=z.device))
            noise = _randn(z, g)
            inputs = self.objective.training_inputs(z, t=t, noise=noise)
            out[f"val_loss_u{u:g}"] = float(self.objective.loss(fn(inputs.x_t, inputs.t, cond), inputs.target,
                                                                inputs.weight))
        out["val_loss"] = sum(out.values()) / len(out)
        return out

    @torch.no_grad()
    def preview(self, main: nn.Module, batch: dict, seed: int) -> torch.Tensor:
        was_training = main.training
        main.eval()
        try:
            z = self.generate(main, batch, seed)
        finally:
            main.train(was_training)
        return self.decode(z)

    # ------------------------------------------------------------------ pieces
    def _to_device(self, value):
        return value.to(self.device) if torch.is_tensor(value) else value

    def _empty_cond(self) -> Optional[dict]:
        if self._empty is None:
            return None
        e = self._empty
        return self._cond_dict(self._to_device(e["text_hidden"]).float(), self._to_device(e["text_mask"]).bool(),
                               self._to_device(e.get("text_pooled")))

    @torch.no_grad()
    def encode_latents(self, batch: dict, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if "latent_mean" in batch:
            partners = sorted(k for k in batch if k.endswith("_flip"))
            if partners:   # picking here would flip latents without the caption's text: the loader's job
                raise ValueError(f"batch carries mirrored partners ({', '.join(partners)}): the data loader picks "
                                 "one of each pair (data.flip_prob, data.mirror_captions)")
            mean, std = self._to_device(batch["latent_mean"]), self._to_device(batch.get("latent_std"))
            z = mean + std * _randn(mean, generator) if (std is not None and self.latents.sample_posterior) \
                else mean
        elif "image" in batch:
            if self.autoencoder is None:
                raise ValueError("batch has raw images but the stage has no autoencoder to encode them")
            posterior = self.autoencoder.encode(self._to_device(batch["image"]))
            z = _posterior_sample(posterior, generator, self.latents.sample_posterior)
        else:
            raise KeyError("batch has neither 'latent_mean' (precomputed) nor 'image' (raw)")
        return ((z.float() - self.latents.shift_factor) * self.latents.scaling_factor)

    @torch.no_grad()
    def condition(self, batch: dict, train: bool = False) -> dict:
        """Batch -> denoiser condition dict (context, context_mask, pooled). Several text encoders
        (ldm/text_encoders.py): per-encoder parts (precomputed or encoded here), each dropped to its
        empty-prompt part with its own probability when `train`, then joined."""
        joiner = self.text_encoder if hasattr(self.text_encoder, "parts_from_batch") else None
        if joiner is not None and ("text_hidden" in batch or "caption" in batch):
            if "text_hidden" in batch:
                parts = [{k: self._to_device(v) for k, v in p.items()} for p in joiner.parts_from_batch(batch)]
            else:
                parts = joiner.encode_parts(list(batch["caption"]))
            if train and joiner.drops_any:
                parts, _ = joiner.drop_parts(parts)
            enc = joiner.join(parts)
            return self._cond_dict(enc["text_hidden"].float(), enc["text_mask"].bool(), enc.get("text_pooled"))
        if "text_hidden" in batch:
            hidden = self._to_device(batch["text_hidden"]).float()
            mask = batch.get("text_mask")
            mask = self._to_device(mask).bool() if mask is not None else \
                torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            pooled = self._to_device(batch.get("text_pooled"))
        elif "caption" in batch:
            if self.text_encoder is None:
                raise ValueError("batch has captions but the stage has no text encoder")
            enc = self.text_encoder(list(batch["caption"]))
            hidden, mask, pooled = enc["text_hidden"], enc["text_mask"], enc.get("text_pooled")
        else:
            raise KeyError("batch has neither 'text_hidden' (precomputed) nor 'caption'")
        return self._cond_dict(hidden, mask, pooled)

    def _cond_dict(self, hidden: torch.Tensor, mask: torch.Tensor, pooled: Optional[torch.Tensor]) -> dict:
        cond = {"context": hidden}
        if self.conditioning.use_text_mask:
            cond["context_mask"] = mask
        if self.use_pooled:
            if pooled is None:
                raise KeyError("the denoiser uses pooled text but the batch has no 'text_pooled'")
            cond["pooled"] = pooled.float()
        return cond

    @torch.no_grad()
    def generate(self, net: nn.Module, batch: dict, seed: int, *, cfg_scale: Optional[float] = None,
                 steps: Optional[int] = None, sampler: Optional[str] = None) -> torch.Tensor:
        """Sample latents (in denoiser units) for the batch's captions or precomputed text."""
        s = self.sampling
        cond = self.condition(batch)
        n = cond["context"].shape[0]
        shape = self._sample_shape(batch)
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((n,) + shape, generator=g).to(self.device)
        fn = self.model_fn(net)
        scale = s.cfg_scale if cfg_scale is None else cfg_scale
        if scale != 1.0:
            uncond = unconditional_like(cond, self.conditioning.null_embedding, self._empty_cond())
            fn = guided(fn, uncond, scale, unit_time=self.objective.unit_time, interval=s.guidance_interval,
                        rescale=s.guidance_rescale)
        return sample(sampler or s.sampler, fn, self.objective, noise, cond, steps or s.steps, eta=s.eta,
                      spacing=s.spacing, shift=s.flow_shift, generator=g, clip_x0=s.clip_x0)

    def _sample_shape(self, batch: dict) -> tuple[int, int, int]:
        if "latent_mean" in batch:
            return tuple(batch["latent_mean"].shape[1:])
        if "image" in batch and self.autoencoder is not None:
            return tuple(self.encode_latents({"image": batch["image"][:1]}).shape[1:])
        if self.latent_shape is None:
            raise ValueError("cannot tell the latent shape: give latent_shape or a batch with latents/images")
        return tuple(self.latent_shape)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> images in [-1, 1]. Without an autoencoder the first three latent channels
        are shown, each image scaled by its largest magnitude."""
        if self.autoencoder is not None:
            x = self.autoencoder.decode(z / self.latents.scaling_factor + self.latents.shift_factor)
            return x.float().clamp(-1, 1)
        img = z[:, :3].float()
        if img.shape[1] < 3:
            img = torch.cat([img, img[:, :1].expand(-1, 3 - img.shape[1], -1, -1)], dim=1)
        return img / img.flatten(1).abs().amax(dim=1).clamp_min(1e-6)[:, None, None, None]
