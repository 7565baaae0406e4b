"""Configuration of the second stage (denoiser, text encoder, objective, conditioning, latents, sampling).

Each dataclass is one YAML section; `launch/runtime/configio.py` builds them and checks ranges
(field metadata), choices (`Literal`) and `validate()` rules, naming the dotted key on error.
Rules that span sections (for example `conditioning.null_embedding: learned` needing
`denoiser.learned_null_tokens > 0`) are checked when the stage is built (`ldm.training`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

QKNorm = Literal["none", "rms", "layer"]


@dataclass
class UNetConfig:
    """SD-style UNet (LDM `openaimodel` topology, the same as diffusers' UNet2DConditionModel)."""
    in_channels: int = field(default=4, metadata={"ge": 1})
    out_channels: int = field(default=4, metadata={"ge": 1})
    sample_size: int = field(default=64, metadata={"ge": 1})          # latent side; informs previews and export
    model_channels: int = field(default=320, metadata={"ge": 1})
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = field(default=2, metadata={"ge": 1})
    attention_levels: tuple[int, ...] = (0, 1, 2)   # levels (index into channel_mult) with transformer blocks
    num_heads: int = field(default=8, metadata={"ge": 1})             # used when head_dim is null (SD1.x)
    head_dim: Optional[int] = field(default=None, metadata={"ge": 1})  # heads = channels // head_dim (SD2.x)
    transformer_depth: int = field(default=1, metadata={"ge": 1})
    context_dim: int = field(default=768, metadata={"ge": 1})
    linear_projection: bool = False     # proj_in/proj_out as Linear (SD2) instead of 1x1 conv (SD1)
    norm_groups: int = field(default=32, metadata={"ge": 1})
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    qk_norm: QKNorm = "none"            # not in SD; makes the model non-convertible to diffusers
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult = {list(self.channel_mult)}: needs at least one level, each >= 1")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels = {list(self.attention_levels)}: levels must be in "
                             f"[0, {len(self.channel_mult) - 1}]")
        for m in self.channel_mult:
            ch = self.model_channels * m
            if ch % self.norm_groups:
                raise ValueError(f"channels {ch} (model_channels * {m}) not divisible by "
                                 f"norm_groups {self.norm_groups}")
            if self.head_dim is not None and ch % self.head_dim:
                raise ValueError(f"channels {ch} not divisible by head_dim {self.head_dim}")
            if self.head_dim is None and ch % self.num_heads:
                raise ValueError(f"channels {ch} not divisible by num_heads {self.num_heads}")


@dataclass
class DiTConfig:
    """DiT over latent patches. Text form: PixArt-alpha (cross-attention, adaLN-single);
    class form (num_classes > 0, cross_attention off, adaln zero, learn_sigma): the original DiT."""
    input_size: int = field(default=32, metadata={"ge": 1})          # latent side
    patch_size: Literal[1, 2, 4] = 2
    in_channels: int = field(default=4, metadata={"ge": 1})
    hidden_size: int = field(default=1152, metadata={"ge": 1})
    depth: int = field(default=28, metadata={"ge": 1})
    num_heads: int = field(default=16, metadata={"ge": 1})
    mlp_ratio: float = field(default=4.0, metadata={"gt": 0})
    context_dim: int = field(default=768, metadata={"ge": 1})        # text token width before caption projection
    cross_attention: bool = True
    caption_projection: bool = True     # MLP context_dim -> hidden (PixArt); off needs context_dim == hidden_size
    adaln: Literal["single", "zero"] = "single"   # PixArt adaLN-single or DiT adaLN-Zero
    qk_norm: QKNorm = "none"            # SD3-style normalisation of q and k per head
    pos_embed: Literal["sincos", "learned"] = "sincos"
    num_classes: int = field(default=0, metadata={"ge": 0})          # > 0: class-label embedding (DiT form)
    learn_sigma: bool = False           # DiT's extra variance channels (kept for the class form's parameter count)
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} not divisible by patch_size {self.patch_size}")
        if self.cross_attention and not self.caption_projection and self.context_dim != self.hidden_size:
            raise ValueError("caption_projection: false needs context_dim == hidden_size")
        if self.hidden_size % 4 and self.pos_embed == "sincos":
            raise ValueError("sincos pos_embed needs hidden_size divisible by 4")


@dataclass
class MMDiTConfig:
    """SD3's MMDiT (ldm/mmdit.py): text and image tokens in two weight streams, one joint attention per block.
    diffusers' SD3Transformer2DModel names: input_size = sample_size, context_dim = joint_attention_dim,
    hidden_size = caption_projection_dim = heads * attention_head_dim (SD3-medium: 24 x 64 = 1536)."""
    input_size: int = field(default=32, metadata={"ge": 1})          # latent side at which positions are based
    patch_size: Literal[1, 2, 4] = 2
    in_channels: int = field(default=16, metadata={"ge": 1})
    out_channels: Optional[int] = field(default=None, metadata={"ge": 1})   # null: in_channels
    hidden_size: int = field(default=1536, metadata={"ge": 1})
    depth: int = field(default=24, metadata={"ge": 1})
    num_heads: int = field(default=24, metadata={"ge": 1})
    mlp_ratio: float = field(default=4.0, metadata={"gt": 0})
    context_dim: int = field(default=4096, metadata={"ge": 1})       # joined text width (T5's with CLIP + T5)
    qk_norm: QKNorm = "rms"             # SD3.5 / SD3 paper's large models use RMS; SD3-medium has none
    context_pre_only: bool = True       # the last block updates image tokens only (SD3)
    # Positions added to the image tokens: a [M, M] grid (M = pos_embed_max_size, null: the base grid
    # input_size / patch_size) centre-cropped to each resolution's grid, as SD3. sincos is fixed (a buffer),
    # learned is a parameter initialised from sincos; none relies on rope.
    pos_embed: Literal["sincos", "learned", "none"] = "sincos"
    pos_embed_max_size: Optional[int] = field(default=None, metadata={"ge": 1})
    rope: bool = False                  # 2-D rotary positions on image q/k (rows and columns, half the head each)
    rope_theta: float = field(default=10000.0, metadata={"gt": 1})
    activation_checkpointing: bool = False

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def max_grid(self) -> int:
        return self.pos_embed_max_size or self.grid

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} not divisible by patch_size {self.patch_size}")
        if self.pos_embed != "none" and self.max_grid < self.grid:
            raise ValueError(f"pos_embed_max_size {self.pos_embed_max_size} is smaller than the base grid "
                             f"{self.grid} (input_size / patch_size)")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError("sincos pos_embed needs hidden_size divisible by 4")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"rope needs a head width divisible by 4 (got {self.hidden_size // self.num_heads})")
        if self.pos_embed == "none" and not self.rope:
            raise ValueError("pos_embed: none without rope leaves the image tokens without positions")


@dataclass
class DenoiserConfig:
    kind: Literal["unet", "dit", "mmdit"] = "unet"
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)
    # Pooled text embedding (width of the text encoder's pooled output) added to the time embedding
    # (SDXL / SD3 style); 0 disables it.
    pooled_dim: int = field(default=0, metadata={"ge": 0})
    # Rows of the learned null caption (PixArt-style) used when `conditioning.null_embedding: learned`;
    # must equal the text length (open_clip context length, 77). 0: no learned null.
    learned_null_tokens: int = field(default=0, metadata={"ge": 0})
    # "xformers" is used only when xformers is installed and the tensors are on CUDA; otherwise SDPA.
    attention_backend: Literal["sdpa", "xformers"] = "sdpa"


@dataclass
class TextEncoderConfig:
    arch: str = "ViT-L-14"             # an open_clip model name (built-in, registered, or `local-dir:PATH`)
    pretrained: Optional[str] = None   # an open_clip pretrained tag or a local checkpoint path; null: random init
    # penultimate gets the final LayerNorm too (SD2 practice); penultimate_raw does not (SD3's hidden_states[-2])
    layer: Literal["last", "penultimate", "penultimate_raw"] = "last"
    model_config: Optional[str] = None  # extra open_clip model-config JSON file or folder to register first
    cache_dir: Optional[str] = None    # where open_clip looks for / downloads tagged weights
    context_length: Optional[int] = field(default=None, metadata={"ge": 2})  # override the tokenizer length
    init_seed: int = 0                 # a random (pretrained: null) tower is seeded, so every process builds the same


@dataclass
class TextEncoderEntry(TextEncoderConfig):
    """One entry of `text.encoders`: an open_clip tower (the fields above) or a T5 encoder (below)."""
    kind: Literal["open_clip", "t5"] = "open_clip"
    path: Optional[str] = None          # t5: folder written by save_pretrained (config.json, weights, tokenizer.json)
    max_length: int = field(default=256, metadata={"ge": 1})        # t5: tokens per caption (padded, truncated)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"    # t5: weights and compute of the frozen encoder
    # Train-time probability that this encoder's output (hidden states, mask, pooled) is replaced by its
    # empty-prompt output, drawn per sample and per encoder independently (SD3: 0.464 each, so that all
    # three are dropped together ~10% of the time); on top of conditioning.dropout_prob, which drops all.
    dropout_prob: float = field(default=0.0, metadata={"ge": 0, "le": 1})

    def validate(self) -> None:
        if self.kind == "t5":
            if not self.path:
                raise ValueError("kind: t5 needs path (the folder of a saved T5 encoder and its tokenizer)")
            if self.layer != "last":
                raise ValueError("kind: t5 takes the last layer (T5's final norm applies to it only)")
        elif self.path is not None:
            raise ValueError("path is for kind: t5; an open_clip tower takes arch / pretrained")


@dataclass
class TextConfig:
    """Several frozen text encoders joined as SD3 does (ldm/text_encoders.py): the open_clip towers'
    hidden states concatenated on channels (list order), zero-padded to the joined width (T5's), then the
    T5 states appended on the sequence axis; masks joined the same way; pooled vectors of the open_clip
    towers concatenated (T5 has none). Empty list: the single `text_encoder:` section is the one encoder."""
    encoders: list[TextEncoderEntry] = field(default_factory=list)


@dataclass
class ObjectiveConfig:
    """Training objective. Time convention (see ldm/objectives.py): larger t is noisier; eps and v use a
    discrete index t in {0..T-1} (fed as is), flow uses t in [0, 1] with t = 1 pure noise (fed as 1000 t)."""
    kind: Literal["eps", "v", "flow"] = "eps"
    # discrete (eps, v)
    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_timesteps: int = field(default=1000, metadata={"ge": 2})
    beta_start: float = field(default=0.00085, metadata={"gt": 0, "lt": 1})
    beta_end: float = field(default=0.012, metadata={"gt": 0, "lt": 1})
    zero_terminal_snr: bool = False     # Lin et al. 2023 rescale; needs kind v (eps is undefined at SNR 0)
    # flow
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = field(default=1.0, metadata={"gt": 0})
    # SD3 time shift t' = s t / (1 + (s - 1) t) (s > 1: more time near the noise end). A number, or "auto":
    # SD3's resolution rule (Esser et al. 2024, sec. 5.3.2) s = shift_base * sqrt(m / n), m the image
    # token count of the batch's latents and n that of the base resolution; with h x w latents and patch p,
    # m / n = (h w / p^2) / (shift_base_latent^2 / p^2) = h w / shift_base_latent^2 (p cancels, so the same
    # rule holds for a UNet). Training draws t with the batch's s; sampling uses the s of the noise's size.
    shift: Union[float, Literal["auto"]] = field(default=1.0, metadata={"gt": 0})
    shift_base: float = field(default=1.0, metadata={"gt": 0})       # s at the base resolution (auto only)
    shift_base_latent: int = field(default=32, metadata={"ge": 1})   # latent side of the base resolution
    # all kinds
    min_snr_gamma: Optional[float] = field(default=None, metadata={"gt": 0})   # null: unweighted
    offset_noise: float = field(default=0.0, metadata={"ge": 0})

    def validate(self) -> None:
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end {self.beta_end} must exceed beta_start {self.beta_start}")
        if self.zero_terminal_snr and self.kind != "v":
            raise ValueError("zero_terminal_snr needs kind: v (eps prediction cannot recover data at SNR 0)")
        if self.shift == "auto" and self.kind != "flow":
            raise ValueError(f"shift: auto applies to kind: flow only (got kind: {self.kind})")


@dataclass
class ConditioningConfig:
    dropout_prob: float = field(default=0.1, metadata={"ge": 0, "le": 1})   # per sample, at train time only
    null_embedding: Literal["empty", "learned"] = "empty"   # empty-prompt embedding or the learned null caption
    use_text_mask: bool = True          # pass the padding mask to cross-attention (SD1/2 attend to all 77 tokens)


@dataclass
class LatentConfig:
    # Tells the runtime what to set up (a frozen autoencoder for online encoding, or none); the stage itself
    # takes whichever the batch carries: `latent_mean`/`latent_std` (precomputed) or `image` (online).
    source: Literal["online", "precomputed"] = "online"
    autoencoder: Optional[str] = None   # export directory of a trained first stage
    # latent = (z - shift_factor) * scaling_factor, z drawn from the posterior.
    # null: taken from the autoencoder export's config.json (measured at the end of stage one).
    scaling_factor: Optional[float] = field(default=None, metadata={"gt": 0})
    shift_factor: Optional[float] = None
    sample_posterior: bool = True       # false: use the posterior mean


@dataclass
class SamplingConfig:
    sampler: Literal["ddpm", "ddim", "euler", "heun", "dpmpp_2m"] = "ddim"
    steps: int = field(default=50, metadata={"ge": 1})
    # Guided prediction = uncond + cfg_scale * (cond - uncond): 1 is unguided, 0 unconditional.
    cfg_scale: float = field(default=5.0, metadata={"ge": 0})
    eta: float = field(default=0.0, metadata={"ge": 0, "le": 1})     # DDIM noise (1 = ancestral)
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"  # discrete objectives only
    # Apply guidance only for unit time u in [lo, hi] (u = 1 is the noise end); null: always.
    guidance_interval: Optional[tuple[float, float]] = None
    guidance_rescale: float = field(default=0.0, metadata={"ge": 0, "le": 1})   # Lin et al. phi
    flow_shift: Optional[float] = field(default=None, metadata={"gt": 0})      # null: objective.shift
    # Clamp each data estimate to [-c, c] while sampling (diffusers' clip_sample); null: off. Needed for
    # eps-prediction on schedules whose noise end has a tiny signal (cosine), see ldm/samplers.py.
    clip_x0: Optional[float] = field(default=None, metadata={"gt": 0})

    def validate(self) -> None:
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"guidance_interval = {list(self.guidance_interval)}: need 0 <= lo <= hi <= 1")


LORA_DEFAULT_TARGETS = {
    # the attention projections (q, k, v, out) of each denoiser, by module-name suffix
    "unet": ("to_q", "to_k", "to_v", "to_out"),
    "dit": ("to_q", "to_k", "to_v", "to_out"),
    "mmdit": ("img_qkv", "txt_qkv", "img_out", "txt_out"),
}


@dataclass
class LoRAConfig:
    """Low-rank adapters through peft (ldm/lora.py). rank 0: off, the whole model trains."""
    rank: int = field(default=0, metadata={"ge": 0})
    alpha: Optional[float] = field(default=None, metadata={"gt": 0})   # null: alpha = rank (scale 1)
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    targets: list[str] = field(default_factory=list)   # module-name suffixes; empty: the attention projections

    def validate(self) -> None:
        for t in self.targets:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"targets = {self.targets!r}: each entry must be a non-empty module name "
                                 f"suffix, e.g. {list(LORA_DEFAULT_TARGETS['unet'])}")
