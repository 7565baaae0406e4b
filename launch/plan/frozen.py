"""The frozen models of stage two, counted per sample: the autoencoder's forward FLOPs and largest feature
map (`autoencoder_forward`), its parameter count, and the text encoders in closed form: open_clip towers
(`TextTower`) and T5 encoders (`T5Tower`), every entry of `text.encoders`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .tape import F32, LOW, ForwardCount, Tape, _finish

# ----------------------------------------------------------------------------- frozen parts

def autoencoder_forward(cfg, image_hw: tuple[int, int], encoder: bool = True, decoder: bool = True,
                        precision: str = "fp32") -> ForwardCount:
    """FLOPs of autoencoder.model.Autoencoder (`cfg`: AutoencoderConfig) on one image of `image_hw`:
    the encoder (+ quant_conv, + the VQ distance matmul) and/or (post_quant_conv +) the decoder. Frozen: nothing is saved;
    `largest_tensor_bytes` is the largest feature map (the encoder's working set in no_grad mode is a
    few of those, see launch/plan.py)."""
    t = Tape(precision, grad=False)
    groups = cfg.norm_groups
    n_lv = len(cfg.ch_mult)

    def resblock(x, hw, c_in, c_out):
        h1 = t.conv(x, hw[0], hw[1], c_in, c_out, 3)
        h2 = t.conv(h1, hw[0], hw[1], c_out, c_out, 3)
        return t.conv(x, hw[0], hw[1], c_in, c_out, 1) if c_in != c_out else h2

    def attn(x, hw, c):
        n = hw[0] * hw[1]
        q = t.linear(x, n, c, c)
        t.linear(x, n, c, c)
        t.linear(x, n, c, c)
        o = t.attention(q, q, q, 1, n, n, c)
        return t.linear(o, n, c, c)

    hw = tuple(image_hw)
    z_out = 2 * cfg.z_channels if cfg.regularizer == "kl" else cfg.z_channels
    q_ch = 2 * cfg.embed_dim if cfg.regularizer == "kl" else cfg.embed_dim
    top = cfg.ch * cfg.ch_mult[-1]
    if encoder:
        x = t.input(cfg.in_channels * hw[0] * hw[1])
        h = t.conv(x, hw[0], hw[1], cfg.in_channels, cfg.ch, 3)
        widths_in = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult[:-1]]
        size = cfg.resolution
        for i, m in enumerate(cfg.ch_mult):
            c_in, c_out = widths_in[i], cfg.ch * m
            for j in range(cfg.num_res_blocks):
                h = resblock(h, hw, c_in if j == 0 else c_out, c_out)
                if size in cfg.attn_resolutions:
                    h = attn(h, hw, c_out)
            if i < n_lv - 1:
                hw = (hw[0] // 2, hw[1] // 2)                 # pad (0,1,0,1), 3x3 stride 2, no padding
                h = t.conv(h, hw[0], hw[1], c_out, c_out, 3)
                size //= 2
        h = resblock(h, hw, top, top)
        if cfg.mid_attention:
            h = attn(h, hw, top)
        h = resblock(h, hw, top, top)
        h = t.conv(h, hw[0], hw[1], top, z_out, 3)
        t.conv(h, hw[0], hw[1], (2 if cfg.regularizer == "kl" else 1) * cfg.z_channels, q_ch, 1)
        if cfg.regularizer == "vq":                            # nearest code: -2 z @ codebook^T
            t.flops += 2 * hw[0] * hw[1] * cfg.n_embed * cfg.embed_dim
    if decoder:
        f = 2 ** (n_lv - 1)
        hw = (image_hw[0] // f, image_hw[1] // f)
        z = t.input(cfg.embed_dim * hw[0] * hw[1])
        z = t.conv(z, hw[0], hw[1], cfg.embed_dim, cfg.z_channels, 1)
        h = t.conv(z, hw[0], hw[1], cfg.z_channels, top, 3)
        h = resblock(h, hw, top, top)
        if cfg.mid_attention:
            h = attn(h, hw, top)
        h = resblock(h, hw, top, top)
        c_in = top
        for i in reversed(range(n_lv)):
            c_out = cfg.ch * cfg.ch_mult[i]
            size = cfg.resolution // 2 ** i
            for j in range(cfg.num_res_blocks + 1):
                h = resblock(h, hw, c_in if j == 0 else c_out, c_out)
                if size in cfg.attn_resolutions:
                    h = attn(h, hw, c_out)
            c_in = c_out
            if i > 0:
                hw = (hw[0] * 2, hw[1] * 2)
                h = t.conv(h, hw[0], hw[1], c_out, c_out, 3)
        t.conv(h, hw[0], hw[1], cfg.ch * cfg.ch_mult[0], cfg.out_channels, 3)
    fc = _finish(t, False)
    widest = max(cfg.ch * m * (image_hw[0] // 2 ** i) * (image_hw[1] // 2 ** i) for i, m in enumerate(cfg.ch_mult))
    fc.largest_tensor_bytes = widest * (F32 if precision != "fp16" else LOW)
    return fc


def autoencoder_params(cfg) -> int:
    """Parameters of autoencoder.model.Autoencoder (encoder + decoder + quant convs + codebook)."""
    def conv(ci, co, k):
        return ci * co * k * k + co

    def norm(c):
        return 2 * c

    def res(ci, co):
        return norm(ci) + conv(ci, co, 3) + norm(co) + conv(co, co, 3) + (conv(ci, co, 1) if ci != co else 0)

    def attn(c):
        return norm(c) + 4 * conv(c, c, 1)

    n_lv, top = len(cfg.ch_mult), cfg.ch * cfg.ch_mult[-1]
    kl = cfg.regularizer == "kl"
    total = conv(cfg.in_channels, cfg.ch, 3)
    widths_in = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult[:-1]]
    size = cfg.resolution
    for i, m in enumerate(cfg.ch_mult):
        ci, co = widths_in[i], cfg.ch * m
        for j in range(cfg.num_res_blocks):
            total += res(ci if j == 0 else co, co) + (attn(co) if size in cfg.attn_resolutions else 0)
        if i < n_lv - 1:
            total += conv(co, co, 3)
            size //= 2
    mid = 2 * res(top, top) + (attn(top) if cfg.mid_attention else 0)
    total += mid + norm(top) + conv(top, (2 if kl else 1) * cfg.z_channels, 3)
    total += conv((2 if kl else 1) * cfg.z_channels, (2 if kl else 1) * cfg.embed_dim, 1)
    total += conv(cfg.embed_dim, cfg.z_channels, 1) + conv(cfg.z_channels, top, 3) + mid
    ci = top
    for i in reversed(range(n_lv)):
        co = cfg.ch * cfg.ch_mult[i]
        size = cfg.resolution // 2 ** i
        for j in range(cfg.num_res_blocks + 1):
            total += res(ci if j == 0 else co, co) + (attn(co) if size in cfg.attn_resolutions else 0)
        ci = co
        if i > 0:
            total += conv(co, co, 3)
    total += norm(cfg.ch * cfg.ch_mult[0]) + conv(cfg.ch * cfg.ch_mult[0], cfg.out_channels, 3)
    if cfg.regularizer == "vq" and not cfg.vq_ema:     # an EMA codebook is a buffer
        total += cfg.n_embed * cfg.embed_dim
    return total


@dataclass(frozen=True)
class TextTower:
    """The shape of an open_clip text transformer (from its model config's text_cfg)."""
    width: int
    layers: int
    heads: int
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512
    mlp_ratio: float = 4.0

    @property
    def params(self) -> int:
        """token + position embeddings, per layer (LN, in_proj 3w^2+3w, out_proj, LN, MLP), final LN,
        projection, logit_scale (open_clip keeps it on the CLIP module the text encoder holds)."""
        w, mw = self.width, int(self.width * self.mlp_ratio)
        layer = 2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w + w * mw + mw + mw * w + w
        return self.vocab_size * w + self.context_length * w + self.layers * layer + 2 * w + w * self.embed_dim + 1

    def forward_flops(self) -> int:
        """Per caption: every layer over all `context_length` tokens, plus the projection of one token."""
        w, mw, L = self.width, int(self.width * self.mlp_ratio), self.context_length
        per_layer = 2 * L * w * 3 * w + 4 * L * L * w + 2 * L * w * w + 2 * L * w * mw * 2
        return self.layers * per_layer + 2 * w * self.embed_dim


def text_tower(text_cfg) -> TextTower:
    """TextEncoderConfig -> TextTower, from open_clip's bundled (or the config's extra) model config."""
    import json
    from pathlib import Path

    tc: Optional[dict] = None
    embed = 512
    if text_cfg.model_config:
        from ldm.text import resolve_model_config

        path = resolve_model_config(text_cfg.model_config)
        files = [path] if path.is_file() else sorted(Path(path).glob("*.json"))
        for f in files:
            if f.stem == text_cfg.arch or len(files) == 1:
                data = json.loads(f.read_text())
                tc, embed = data["text_cfg"], data.get("embed_dim", embed)
    if tc is None:
        import open_clip

        data = open_clip.get_model_config(text_cfg.arch)
        if data is None:
            raise ValueError(f"text_encoder.arch {text_cfg.arch!r}: not an open_clip model config")
        tc, embed = data["text_cfg"], data.get("embed_dim", embed)
    ctx = text_cfg.context_length or tc.get("context_length", 77)
    return TextTower(width=tc.get("width", 512), layers=tc.get("layers", 12), heads=tc.get("heads", 8),
                     context_length=ctx, vocab_size=tc.get("vocab_size", 49408), embed_dim=embed,
                     mlp_ratio=tc.get("mlp_ratio", 4.0))


# T5 v1.1 encoder shapes (google/t5-v1_1-*'s config.json), for planning before the folder is downloaded:
# a folder name ending in one of these is taken to be that model when its config.json is not there yet.
T5_V1_1 = {"small": (512, 1024, 8, 6), "base": (768, 2048, 12, 12), "large": (1024, 2816, 24, 16),
           "xl": (2048, 5120, 24, 32), "xxl": (4096, 10240, 24, 64)}     # d_model, d_ff, layers, heads


@dataclass(frozen=True)
class T5Tower:
    """The shape of a T5 encoder (transformers' T5EncoderModel; from its config.json)."""
    d_model: int
    d_ff: int
    layers: int
    heads: int
    d_kv: int = 64
    vocab_size: int = 32128
    gated: bool = True                  # feed_forward_proj gated-gelu (v1.1) or relu (original T5)
    buckets: int = 32
    context_length: int = 256           # max_length of the entry
    bytes_per_param: int = 4

    @property
    def params(self) -> int:
        """shared embedding, per layer (RMS norm, q k v o, RMS norm, wi(_0, _1), wo), the first layer's
        relative position bias, final RMS norm."""
        d, inner = self.d_model, self.heads * self.d_kv
        ff = (3 if self.gated else 2) * d * self.d_ff
        return self.vocab_size * d + self.layers * (2 * d + 4 * d * inner + ff) + self.buckets * self.heads + d

    def forward_flops(self) -> int:
        d, inner, L = self.d_model, self.heads * self.d_kv, self.context_length
        per_layer = 2 * L * d * 4 * inner + 4 * L * L * inner + 2 * L * d * self.d_ff * (3 if self.gated else 2)
        return self.layers * per_layer


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def t5_tower(entry) -> T5Tower:
    """A `kind: t5` entry -> T5Tower, from the folder's config.json, else a T5 v1.1 size named by the folder."""
    import json
    from pathlib import Path

    from ldm.t5 import resolve_t5_folder

    common = {"context_length": entry.max_length, "bytes_per_param": _BYTES[entry.dtype]}
    try:
        c = json.loads((resolve_t5_folder(entry.path) / "config.json").read_text())
    except FileNotFoundError:
        name = Path(str(entry.path)).name.lower()
        size = next((s for s in sorted(T5_V1_1, key=len, reverse=True) if name.endswith(s)), None)
        if size is None:
            raise
        d, ff, layers, heads = T5_V1_1[size]
        return T5Tower(d, ff, layers, heads, **common)
    return T5Tower(c["d_model"], c["d_ff"], c["num_layers"], c["num_heads"], c.get("d_kv", 64),
                   c.get("vocab_size", 32128), str(c.get("feed_forward_proj", "relu")).startswith("gated"),
                   c.get("relative_attention_num_buckets", 32), **common)
