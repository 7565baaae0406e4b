"""Configuration of the first stage (the `autoencoder:` and `loss:` sections).

Ranges live in field metadata (ge/gt/le/lt), choices in ``Literal``, cross-field rules in
``validate()``; ``launch/runtime/configio.py`` reads them. Defaults follow the published LDM kl-f8
first stage unless a comment says otherwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class AutoencoderConfig:
    # --- architecture (LDM `ddconfig`) ---
    in_channels: int = field(default=3, metadata={"ge": 1})
    out_channels: int = field(default=3, metadata={"ge": 1})
    resolution: int = field(default=256, metadata={"ge": 8})      # only decides where attn_resolutions apply
    ch: int = field(default=128, metadata={"ge": 1})
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)                        # one level per entry; downsample factor 2**(len-1)
    num_res_blocks: int = field(default=2, metadata={"ge": 1})
    z_channels: int = field(default=4, metadata={"ge": 1})         # encoder output / decoder input channels
    embed_dim: int = field(default=4, metadata={"ge": 1})          # latent channels after quant_conv
    attn_resolutions: tuple[int, ...] = ()                        # extra attention at these feature sizes
    mid_attention: bool = True                                     # attention in the mid (lowest-resolution) block
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    norm_groups: int = field(default=32, metadata={"ge": 1})       # GroupNorm groups; every width must divide
    regularizer: Literal["kl", "vq", "fsq"] = "kl"
    # --- vq ---
    n_embed: int = field(default=8192, metadata={"ge": 2})
    vq_beta: float = field(default=0.25, metadata={"ge": 0})       # commitment weight, on the encoder term
    vq_ema: bool = False                                           # codebook by EMA of assignments, not by gradient
    vq_ema_decay: float = field(default=0.99, metadata={"gt": 0, "lt": 1})
    vq_restart: bool = False                                       # re-seed dead codes from recent encoder outputs
    vq_restart_every: int = field(default=200, metadata={"ge": 1})  # training forwards between restart checks
    # a code is dead when its running frequency is below vq_dead_threshold / n_embed (uniform use = 1 / n_embed)
    vq_dead_threshold: float = field(default=0.03, metadata={"gt": 0, "lt": 1})
    vq_usage_decay: float = field(default=0.99, metadata={"gt": 0, "lt": 1})  # running usage histogram
    # --- fsq (Mentzer et al. 2023): embed_dim must equal len(fsq_levels) ---
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    # --- latent statistics (scaling_factor = 1/std, shift_factor = mean) ---
    latent_stats_batches: int = field(default=32, metadata={"ge": 1})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult = {list(self.ch_mult)}: needs at least one level, each >= 1")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"width ch*ch_mult = {self.ch}*{m} is not divisible by norm_groups = {self.norm_groups}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution = {self.resolution} is not divisible by the downsample factor "
                             f"{self.downsample_factor} (2**(len(ch_mult)-1))")
        reachable = {self.resolution // 2 ** i for i in range(len(self.ch_mult))}
        bad = [r for r in self.attn_resolutions if r not in reachable]
        if bad:
            raise ValueError(f"attn_resolutions = {list(self.attn_resolutions)}: {bad} never occur; "
                             f"feature sizes are {sorted(reachable, reverse=True)}")
        if self.regularizer == "fsq":
            if any(level < 2 for level in self.fsq_levels) or not self.fsq_levels:
                raise ValueError(f"fsq_levels = {list(self.fsq_levels)}: each level must be >= 2")
            if self.embed_dim != len(self.fsq_levels):
                raise ValueError(f"regularizer fsq: embed_dim = {self.embed_dim} must equal "
                                 f"len(fsq_levels) = {len(self.fsq_levels)}")


@dataclass
class AutoencoderLossConfig:
    # Reconstruction terms follow LDM's sums per sample, divided by the number of pixel values
    # (C*H*W): the weights below mean what they mean in the LDM configs, the loss stays O(1).
    l1_weight: float = field(default=1.0, metadata={"ge": 0})
    l2_weight: float = field(default=0.0, metadata={"ge": 0})
    perceptual_weight: float = field(default=1.0, metadata={"ge": 0})   # 0: no LPIPS is built (warned)
    # "vgg16": real LPIPS (ImageNet VGG16 from vgg_path, else $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth);
    # "random": test-only random backbone, logged as "perceptual_random", never as "lpips".
    perceptual_backbone: Literal["vgg16", "random"] = "vgg16"
    vgg_path: Optional[str] = None
    vgg_sha256: Optional[str] = None     # expected sha256 (or a prefix) when the file name carries no "-<hex>."
    kl_weight: float = field(default=1e-6, metadata={"ge": 0})
    codebook_weight: float = field(default=1.0, metadata={"ge": 0})
    logvar_init: float = 0.0
    learn_logvar: bool = False           # LDM declares logvar but never optimises it; opt in here
    # --- discriminator (PatchGAN) ---
    disc_weight: float = field(default=0.5, metadata={"ge": 0})        # 0: no discriminator at all
    disc_factor: float = field(default=1.0, metadata={"ge": 0})
    disc_start: int = field(default=50001, metadata={"ge": 0})         # generator optimizer steps before the GAN
    # D trains from max(0, disc_start - disc_warmup_steps): it learns before its loss reaches G
    disc_warmup_steps: int = field(default=0, metadata={"ge": 0})
    disc_layers: int = field(default=3, metadata={"ge": 1, "le": 6})
    disc_channels: int = field(default=64, metadata={"ge": 1})
    # "group" (default) and "none" are per-sample; "batch" normalises the concatenated real+fake batch.
    disc_norm: Literal["group", "batch", "none"] = "group"
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    adaptive_weight: bool = True          # scale the GAN term by |grad nll| / |grad gan| at decoder.conv_out
    adaptive_weight_max: float = field(default=1e4, metadata={"gt": 0})
    disc_lr: Optional[float] = field(default=None, metadata={"gt": 0})  # None: the optimizer's lr
    gan_steps: Literal["joint", "alternating"] = "joint"

    @property
    def use_discriminator(self) -> bool:
        return self.disc_weight > 0 and self.disc_factor > 0

    def validate(self) -> None:
        if self.vgg_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", self.vgg_sha256):
            raise ValueError(f"vgg_sha256 = {self.vgg_sha256!r} must be 8 to 64 hex digits")
