#!/usr/bin/env python3
"""Generate (or check) the `tiny` model profile: small random-weight ONNX models with exactly
the input/output contract of the real LatentSync models (see models/manifest.toml).

The pipeline runs end to end with them; the generated mouth is noise. They exist for tests
and smoke runs, are rebuilt in seconds and are never committed.

  python models/gen_tiny.py [--out models/generated/tiny]          # write the profile
  python models/gen_tiny.py --check [--out models/generated/tiny]  # verify it with onnxruntime

Output directory contents:
  whisper_encoder.onnx  mel [1,80,3000] -> hidden_states [1,5,1500,384]
  vae_encoder.onnx      image [N,3,H,W] -> latent_mean, latent_logvar [N,4,H/8,W/8]
  vae_decoder.onnx      latent [N,4,h,w] -> image [N,3,8h,8w]
  unet.onnx             sample [B,13,F,h,w], timestep int64 [1],
                        encoder_hidden_states [B*F,50,384] -> noise_pred [B,4,F,h,w]
  unet_deepcache_full.onnx, unet_deepcache_shallow.onnx   the DeepCache pair
  ddim_step.onnx        noise_pred [B,4,F,h,w], sample [B|1,13,F,h,w], guidance [1],
                        c_sample, c_eps float64 [1] -> latents [1,4,F,h,w],
                        next_sample [B,13,F,h,w]   (no weights)
  mask.png              the LatentSync keep-mask at the profile resolution (gen_mask.py)
  manifest.lock.toml    sha256 and size of every file above

Determinism: weights come from numpy's legacy RandomState (its stream is frozen across
numpy versions) with a fixed seed, graphs are built in a fixed order and serialised without
timestamps, so every run writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gen_mask  # noqa: E402

PROFILE = "tiny"
GENERATOR_VERSION = 2
SEED = 1247  # LatentSync's default inference seed
OPSET = 17
IR_VERSION = 8  # opset 17 needs IR >= 8; ONNX Runtime 1.31 loads it
RESOLUTION = 256

# Contract constants (shared with the real models).
N_MELS, MEL_FRAMES = 80, 3000
AUDIO_POS, AUDIO_DIM, AUDIO_LAYERS = 1500, 384, 5
AUDIO_TOKENS = 50
LATENT_C, UNET_IN_C = 4, 13

FILES = {
    "whisper_encoder": "whisper_encoder.onnx",
    "vae_encoder": "vae_encoder.onnx",
    "vae_decoder": "vae_decoder.onnx",
    "unet": "unet.onnx",
    # DeepCache (infer.deepcache_interval > 0): the full step that also returns the deep
    # feature, and the shallow step that reuses it (same weights as unet.onnx).
    "unet_deepcache_full": "unet_deepcache_full.onnx",
    "unet_deepcache_shallow": "unet_deepcache_shallow.onnx",
    # One DDIM step on the device (no weights; the same graph in every profile): the
    # guidance mix, the deterministic DDIM update and the next UNet input.
    "ddim_step": "ddim_step.onnx",
}
DEEPCACHE_ROLES = ("unet_deepcache_full", "unet_deepcache_shallow")
MASK_FILE = "mask.png"
LOCK_FILE = "manifest.lock.toml"


# --------------------------------------------------------------------------------------------
# Graph building helpers
# --------------------------------------------------------------------------------------------


class G:
    """Tiny ONNX graph builder: unique names, initialisers, seeded weights."""

    def __init__(self, name: str, rng: np.random.RandomState):
        self.name = name
        self.rng = rng
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def _id(self, p: str) -> str:
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, arr, p="c") -> str:
        name = self._id(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def i64(self, values, p="shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), p)

    def f32(self, values, p="k") -> str:
        return self.const(np.asarray(values, dtype=np.float32), p)

    def weight(self, shape, fan_in, gain=1.0, p="w") -> str:
        std = gain / math.sqrt(fan_in)
        w = (self.rng.standard_normal(size=shape) * std).astype(np.float32)
        return self.const(w, p)

    def bias(self, n, scale=0.02, offset=0.0, p="b") -> str:
        b = (self.rng.standard_normal(size=(n,)) * scale + offset).astype(np.float32)
        return self.const(b, p)

    def op(self, op_type, inputs, n_out=1, p=None, **attrs):
        outs = [self._id(p or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._id("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    # ---- layers ----
    def conv(self, x, cin, cout, k=3, stride=1, gain=1.0):
        w = self.weight((cout, cin, k, k), cin * k * k, gain, "conv_w")
        b = self.bias(cout, p="conv_b")
        pad = k // 2
        return self.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])], p="silu")

    def quick_gelu(self, x):  # x * sigmoid(1.702 x); no Gelu op before opset 20
        return self.op("Mul", [x, self.op("Sigmoid", [self.op("Mul", [x, self.f32(1.702)])])], p="gelu")

    def linear(self, x, cin, cout, bias=True, gain=1.0):
        y = self.op("MatMul", [x, self.weight((cin, cout), cin, gain, "lin_w")])
        return self.op("Add", [y, self.bias(cout, p="lin_b")]) if bias else y

    def upsample2(self, x):  # nearest x2 on the last two axes (PyTorch F.interpolate nearest)
        return self.op(
            "Resize", [x, "", self.f32([1.0, 1.0, 2.0, 2.0], "scales")],
            mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
        )

    def shape_slice(self, shape, start, end):
        return self.op("Slice", [shape, self.i64([start]), self.i64([end])], p="dims")

    def model(self, inputs, outputs, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits, doc_string=doc)
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="lipsync/models/gen_tiny.py",
            producer_version=str(GENERATOR_VERSION),
            doc_string=f"lipsync '{PROFILE}' profile: random weights, real LatentSync I/O contract. {doc}",
        )
        m.ir_version = IR_VERSION
        m.model_version = GENERATOR_VERSION
        helper.set_model_props(m, {"lipsync.profile": PROFILE, "lipsync.seed": str(SEED)})
        return m


def vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_whisper(rng) -> onnx.ModelProto:
    """Whisper-tiny-encoder stand-in: stride-2 conv + positional embedding + 4 residual blocks;
    returns the embedding output and each block output (no ln_post), stacked on axis 1."""
    g = G("tiny_whisper_encoder", rng)
    w = g.weight((AUDIO_DIM, N_MELS, 3), N_MELS * 3, 1.0, "conv_w")
    b = g.bias(AUDIO_DIM, p="conv_b")
    x = g.op("Conv", ["mel", w, b], kernel_shape=[3], strides=[2], pads=[1, 1])  # [1,384,1500]
    x = g.quick_gelu(x)
    x = g.op("Transpose", [x], perm=[0, 2, 1])  # [1,1500,384]
    pos = g.const((rng.standard_normal(size=(AUDIO_POS, AUDIO_DIM)) * 0.1).astype(np.float32), "pos_emb")
    x = g.op("Add", [x, pos], p="embed")
    states = [x]
    hidden = 96
    for _ in range(4):
        gamma = g.f32(np.ones(AUDIO_DIM), "ln_g")
        beta = g.f32(np.zeros(AUDIO_DIM), "ln_b")
        h = g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
        h = g.op("Tanh", [g.linear(h, AUDIO_DIM, hidden)])
        h = g.linear(h, hidden, AUDIO_DIM, gain=0.5)
        x = g.op("Add", [x, h], p="block")
        states.append(x)
    ax1 = g.i64([1], "axes")
    stacked = [g.op("Unsqueeze", [s, ax1]) for s in states]
    g.nodes.append(helper.make_node("Concat", stacked, ["hidden_states"], name="n_stack", axis=1))
    return g.model(
        [vi("mel", TensorProto.FLOAT, [1, N_MELS, MEL_FRAMES])],
        [vi("hidden_states", TensorProto.FLOAT, [1, AUDIO_LAYERS, AUDIO_POS, AUDIO_DIM])],
        "Whisper tiny encoder: embedding + 4 block outputs.",
    )


def build_vae_encoder(rng) -> onnx.ModelProto:
    """KL-f8 VAE encoder stand-in: three stride-2 convs, moments split into mean / logvar."""
    g = G("tiny_vae_encoder", rng)
    x = g.silu(g.conv("image", 3, 16, stride=2))
    x = g.silu(g.conv(x, 16, 16, stride=2))
    x = g.silu(g.conv(x, 16, 16, stride=2))
    w = g.weight((8, 16, 3, 3), 16 * 9, 1.0, "moments_w")
    # logvar channels biased to about -6 (std ~0.05), like a trained VAE's small posterior std
    b = g.const(np.concatenate([np.zeros(4), np.full(4, -6.0)]).astype(np.float32), "moments_b")
    moments = g.op("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.nodes.append(helper.make_node("Split", [moments, g.i64([4, 4], "split")], ["latent_mean", "logvar_raw"],
                                    name="n_split", axis=1))
    # diffusers' DiagonalGaussianDistribution clamps logvar to [-30, 20]
    g.nodes.append(helper.make_node("Clip", ["logvar_raw", g.f32(-30.0), g.f32(20.0)], ["latent_logvar"],
                                    name="n_clip"))
    lat = ["N", LATENT_C, "H/8", "W/8"]
    return g.model(
        [vi("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [vi("latent_mean", TensorProto.FLOAT, lat), vi("latent_logvar", TensorProto.FLOAT, lat)],
        "VAE encoder: image in [-1,1] -> unscaled posterior mean and log-variance.",
    )


def build_vae_decoder(rng) -> onnx.ModelProto:
    """KL-f8 VAE decoder stand-in: convs with three nearest x2 upsamplings, tanh output
    (the last upsampling is applied to the RGB output, so 2x2 pixel blocks are equal)."""
    g = G("tiny_vae_decoder", rng)
    x = g.silu(g.conv("latent", LATENT_C, 16))
    x = g.silu(g.conv(g.upsample2(x), 16, 16))
    x = g.silu(g.conv(g.upsample2(x), 16, 8))
    x = g.conv(x, 8, 3, k=1)  # to RGB at 4x, then the last upsampling: keeps it cheap at full size
    g.nodes.append(helper.make_node("Tanh", [g.upsample2(x)], ["image"], name="n_out"))
    return g.model(
        [vi("latent", TensorProto.FLOAT, ["N", LATENT_C, "h", "w"])],
        [vi("image", TensorProto.FLOAT, ["N", 3, "8*h", "8*w"])],
        "VAE decoder: unscaled latent -> image in [-1,1].",
    )


def build_unet(rng, variant: str = "plain") -> onnx.ModelProto:
    """UNet3DConditionModel stand-in. Frames are folded into the batch (row b*F+f) like the real
    model's inflated convs; timestep via a sinusoidal embedding + MLP; audio via single-head
    cross-attention of the image tokens of frame (b, f) on that frame's 50 audio tokens;
    a temporal mixing term across the F frames; one down/up level with a skip.

    variant: "plain" (unet.onnx), "full" (also returns the deep feature: the output of the
    deep branch, down + attention + up conv, before it joins the shallow skip) or "shallow"
    (takes that deep feature as an input and runs only the shallow layers), the DeepCache
    split of the real UNet at its first branch (models/README.md). All three consume the
    random stream identically, so they hold the same weights."""
    g = G("tiny_unet", rng)
    C, C2, D, TEMB = 8, 16, 16, 32

    s = g.op("Shape", ["sample"], p="sample_shape")  # [B,13,F,h,w]
    dim_b = g.shape_slice(s, 0, 1)
    dim_f = g.shape_slice(s, 2, 3)
    dim_hw = g.shape_slice(s, 3, 5)
    minus1 = g.i64([-1], "m1")

    # [B,13,F,h,w] -> [B,F,13,h,w] -> [B*F,13,h,w]
    x = g.op("Transpose", ["sample"], perm=[0, 2, 1, 3, 4])
    x = g.op("Reshape", [x, g.op("Concat", [minus1, g.i64([UNET_IN_C]), dim_hw], axis=0)])
    h1 = g.conv(x, UNET_IN_C, C)  # [BF,C,h,w]

    # timestep embedding (diffusers Timesteps(flip_sin_to_cos=True, shift=0) style) -> MLP
    half = TEMB // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    t = g.op("Cast", ["timestep"], to=TensorProto.FLOAT)  # [1]
    t = g.op("Unsqueeze", [t, g.i64([1], "axes")])  # [1,1]
    arg = g.op("Mul", [t, g.const(freqs.reshape(1, half), "freqs")])  # [1,half]
    temb = g.op("Concat", [g.op("Cos", [arg]), g.op("Sin", [arg])], axis=1)  # [1,TEMB]
    temb = g.linear(g.silu(g.linear(temb, TEMB, C)), C, C)  # [1,C]
    temb = g.op("Reshape", [temb, g.i64([1, C, 1, 1])])
    h1 = g.silu(g.op("Add", [h1, temb]))

    # down
    d = g.silu(g.conv(h1, C, C2, stride=2))  # [BF,C2,h/2,w/2]
    d_shape = g.op("Shape", [d])

    # audio cross-attention: queries from the frame's image tokens, keys/values from its audio
    q = g.op("Reshape", [d, g.op("Concat", [g.shape_slice(d_shape, 0, 2), minus1], axis=0)])  # [BF,C2,T]
    q = g.linear(g.op("Transpose", [q], perm=[0, 2, 1]), C2, D, bias=False)  # [BF,T,D]
    k = g.linear("encoder_hidden_states", AUDIO_DIM, D, bias=False)  # [BF,50,D]
    v = g.linear("encoder_hidden_states", AUDIO_DIM, D, bias=False)  # [BF,50,D]
    att = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])  # [BF,T,50]
    att = g.op("Softmax", [g.op("Mul", [att, g.f32(1.0 / math.sqrt(D))])], axis=-1)
    a = g.linear(g.op("MatMul", [att, v]), D, C2, bias=False, gain=2.0)  # [BF,T,C2]
    a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1]), d_shape])  # [BF,C2,h/2,w/2]
    d = g.op("Add", [d, a], p="xattn")

    # temporal mixing: add half the mean over the F frames of the same batch item
    d5 = g.op("Reshape", [d, g.op("Concat", [dim_b, dim_f, minus1], axis=0)])  # [B,F,*]
    tm = g.op("ReduceMean", [d5], axes=[1], keepdims=1)
    d5 = g.op("Add", [d5, g.op("Mul", [tm, g.f32(0.5)])])
    d = g.op("Reshape", [d5, d_shape])

    # up (nearest, to the skip's exact spatial size; batch and channels kept) + skip.
    # (Generator 1 passed the skip's whole shape, channels included: a 16 -> 8 channel
    # "resize" that only ONNX Runtime's full optimisation level happened to run.)
    up_size = g.op("Concat", [g.shape_slice(d_shape, 0, 2), g.shape_slice(g.op("Shape", [h1]), 2, 4)], axis=0)
    u = g.op("Resize", [d, "", "", up_size], mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    deep = g.conv(u, C2, C)  # [BF,C,h,w]: the DeepCache deep feature
    u = g.silu(g.op("Add", [deep, h1], p="skip"))
    out = g.conv(u, C, LATENT_C, gain=1.5)  # [BF,4,h,w]

    # [B*F,4,h,w] -> [B,F,4,h,w] -> [B,4,F,h,w]
    out = g.op("Reshape", [out, g.op("Concat", [dim_b, dim_f, g.i64([LATENT_C]), dim_hw], axis=0)])
    g.nodes.append(helper.make_node("Transpose", [out], ["noise_pred"], name="n_out", perm=[0, 2, 1, 3, 4]))
    inputs = [
        vi("sample", TensorProto.FLOAT, ["B", UNET_IN_C, "F", "h", "w"]),
        vi("timestep", TensorProto.INT64, [1]),
        vi("encoder_hidden_states", TensorProto.FLOAT, ["B*F", AUDIO_TOKENS, AUDIO_DIM]),
    ]
    outputs = [vi("noise_pred", TensorProto.FLOAT, ["B", LATENT_C, "F", "h", "w"])]
    doc = "UNet: [noise 4 | mask 1 | masked latents 4 | reference latents 4] -> epsilon."
    deep_vi = vi("deep_feature", TensorProto.FLOAT, ["B", "C_deep", "F", "h", "w"])
    if variant == "full":
        # [B*F,C,h,w] -> [B,F,C,h,w] -> [B,C,F,h,w] (the real UNet's 5-D layout)
        d5 = g.op("Reshape", [deep, g.op("Concat", [dim_b, dim_f, g.i64([C]), dim_hw], axis=0)])
        g.nodes.append(helper.make_node("Transpose", [d5], ["deep_feature"], name="n_deep_out",
                                        perm=[0, 2, 1, 3, 4]))
        outputs.append(deep_vi)
        doc += " DeepCache full step: also returns the deep feature."
    elif variant == "shallow":
        d5 = g.op("Transpose", ["deep_feature"], perm=[0, 2, 1, 3, 4])  # [B,F,C,h,w]
        cached = g.op("Reshape", [d5, g.op("Concat", [minus1, g.i64([C]), dim_hw], axis=0)])
        for n in g.nodes:
            for k, name in enumerate(n.input):
                if name == deep:
                    n.input[k] = cached
        inputs.append(deep_vi)
        _prune(g, ["noise_pred"])
        doc += " DeepCache shallow step: reuses the deep feature of the last full step."
    return g.model(inputs, outputs, doc)


def _prune(g: G, outputs) -> None:
    """Re-sort the nodes topologically (the rewired input's nodes were appended last), then
    drop the nodes and initialisers that no graph output depends on (order kept)."""
    ready = {t.name for t in g.inits} | {"sample", "timestep", "encoder_hidden_states", "deep_feature", ""}
    pending, ordered = list(g.nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        assert len(rest) < len(pending), "cycle in the tiny UNet graph"
        pending = rest
    need = set(outputs)
    keep = []
    for n in reversed(ordered):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    g.nodes = list(reversed(keep))
    g.inits = [t for t in g.inits if t.name in need]

def build_ddim_step(_rng=None) -> onnx.ModelProto:
    """One DDIM step of a chunk on the execution provider, so that the UNet input, the noise
    prediction and the latents stay on the device between steps (IO binding):

      eps         = u + guidance * (c - u)      u = noise_pred[0], c = noise_pred[B-1] (float32;
                                                with B = 1, u = c and eps = noise_pred exactly)
      latents     = float32(c_sample * float64(x) + c_eps * float64(eps))   x = sample[0, 0:4]
      next_sample = [latents | sample[0, 4:13]] repeated B times on the batch axis

    The update is the deterministic DDIM step (eta 0, epsilon prediction, no clipping) with its
    per-step coefficients c_sample = sqrt(a_prev / a_t) and c_eps = sqrt(1 - a_prev) -
    sqrt(a_prev (1 - a_t) / a_t), computed by the caller from the schedule (the Rust side's
    Ddim::coefficients, final alpha and set_alpha_to_one included), in float64 as the host
    update did. The same operations in the same order as the host code, so the results are
    the same floats. No weights: the graph is the same for every profile."""
    g = G("ddim_step", np.random.RandomState(0))
    axes0 = g.i64([0], "axes")
    u = g.op("Slice", ["noise_pred", g.i64([0]), g.i64([1]), axes0], p="eps_uncond")
    c = g.op("Slice", ["noise_pred", g.i64([-1]), g.i64([np.iinfo(np.int64).max]), axes0], p="eps_cond")
    eps = g.op("Add", [u, g.op("Mul", ["guidance", g.op("Sub", [c, u])])], p="eps")
    axes01 = g.i64([0, 1], "axes")
    x = g.op("Slice", ["sample", g.i64([0, 0]), g.i64([1, LATENT_C]), axes01], p="latents_in")
    cond = g.op("Slice", ["sample", g.i64([0, LATENT_C]), g.i64([1, UNET_IN_C]), axes01], p="cond")
    x64 = g.op("Mul", [g.op("Cast", [x], to=TensorProto.DOUBLE), "c_sample"])
    e64 = g.op("Mul", [g.op("Cast", [eps], to=TensorProto.DOUBLE), "c_eps"])
    g.nodes.append(helper.make_node("Cast", [g.op("Add", [x64, e64])], ["latents"], name="n_latents",
                                    to=TensorProto.FLOAT))
    one = g.op("Concat", ["latents", cond], axis=1, p="next_item")
    batch = g.op("Shape", ["noise_pred"], start=0, end=1, p="batch")
    repeats = g.op("Concat", [batch, g.i64([1, 1, 1, 1])], axis=0, p="repeats")
    g.nodes.append(helper.make_node("Tile", [one, repeats], ["next_sample"], name="n_next_sample"))
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE
    return g.model(
        [vi("noise_pred", f32, ["B", LATENT_C, "F", "h", "w"]), vi("sample", f32, ["Bs", UNET_IN_C, "F", "h", "w"]),
         vi("guidance", f32, [1]), vi("c_sample", f64, [1]), vi("c_eps", f64, [1])],
        [vi("latents", f32, [1, LATENT_C, "F", "h", "w"]), vi("next_sample", f32, ["B", UNET_IN_C, "F", "h", "w"])],
        "One DDIM step: guidance mix, eta-0 update, next UNet input.",
    )


def ddim_step_reference(noise_pred, sample, guidance, c_sample, c_eps):
    """numpy rendition of ddim_step.onnx (the host update it replaced), for the checks."""
    u, c = noise_pred[:1], noise_pred[-1:]
    eps = (u + np.float32(guidance) * (c - u)).astype(np.float32)
    x = sample[:1, :LATENT_C].astype(np.float64)
    lat = (c_sample * x + c_eps * eps.astype(np.float64)).astype(np.float32)
    item = np.concatenate([lat, sample[:1, LATENT_C:]], axis=1)
    return lat, np.repeat(item, noise_pred.shape[0], axis=0)


def check_ddim_step(s, expect, rs, lat: int) -> None:
    """ddim_step.onnx against its numpy rendition: CFG (B=2) and B=1, a short chunk, the
    last step's coefficients (c_eps of the final alpha). Shared with the exporter's check."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    for b, f, (t, prev), g in ((2, 16, (951, 901), 1.5), (1, 5, (1, None), 1.0), (2, 3, (501, 451), 3.0)):
        a_t, a_p = ac[t], (ac[prev] if prev is not None else ac[0])
        c_x = np.sqrt(a_p / a_t)
        c_e = np.sqrt(1.0 - a_p) - np.sqrt(a_p * (1.0 - a_t) / a_t)
        eps = rs.standard_normal((b, LATENT_C, f, lat, lat)).astype(np.float32)
        item = rs.standard_normal((1, UNET_IN_C, f, lat, lat)).astype(np.float32)
        sample = np.repeat(item, b, axis=0)
        feeds = {"noise_pred": eps, "sample": sample, "guidance": np.array([g], np.float32),
                 "c_sample": np.array([c_x]), "c_eps": np.array([c_e])}
        got_lat, got_next = s.run(None, feeds)
        want_lat, want_next = ddim_step_reference(eps, sample, g, c_x, c_e)
        d = max(float(np.abs(got_lat - want_lat).max()), float(np.abs(got_next - want_next).max()))
        expect(got_lat.shape == (1, LATENT_C, f, lat, lat) and got_next.shape == sample.shape and d <= 1e-6,
               f"ddim_step B={b} F={f} t={t} g={g}: latents {got_lat.shape}, next_sample {got_next.shape}, "
               f"max |diff| vs numpy {d:.1e}")
        if b == 1:
            x0 = (item[:, :LATENT_C].astype(np.float64) - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            ddim = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps
            expect(float(np.abs(got_lat - ddim).max()) < 1e-4,
                   "B=1: the DDIM formula via x0 (eta 0), the final alpha = alphas_cumprod[0]")
        step1 = s.run(None, dict(feeds, sample=item))
        expect(all(np.array_equal(p, q) for p, q in zip(step1, (got_lat, got_next))),
               f"B={b}: a batch-1 sample gives the same step (the first UNet input is uploaded once)")



BUILDERS = {
    "whisper_encoder": build_whisper,
    "vae_encoder": build_vae_encoder,
    "vae_decoder": build_vae_decoder,
    "unet": build_unet,
    "unet_deepcache_full": lambda rng: build_unet(rng, "full"),
    "unet_deepcache_shallow": lambda rng: build_unet(rng, "shallow"),
    "ddim_step": build_ddim_step,
}
# Random stream of each model; the DeepCache graphs share the UNet's (same weights).
SEEDS = {role: SEED + i for i, role in enumerate(("whisper_encoder", "vae_encoder", "vae_decoder", "unet"))}
SEEDS.update({role: SEEDS["unet"] for role in DEEPCACHE_ROLES})
SEEDS["ddim_step"] = 0  # no weights


# --------------------------------------------------------------------------------------------
# Generate
# --------------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def generate(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for role, build in BUILDERS.items():
        rng = np.random.RandomState(SEEDS[role])  # one stream per model (DeepCache: the UNet's)
        model = build(rng)
        onnx.checker.check_model(model, full_check=True)
        data = model.SerializeToString()
        (out / FILES[role]).write_bytes(data)
        written[role] = (FILES[role], data)
    mask = gen_mask.png_bytes(gen_mask.render(RESOLUTION))
    (out / MASK_FILE).write_bytes(mask)
    written["mask"] = (MASK_FILE, mask)

    lines = [
        "# Written by models/gen_tiny.py; do not edit. sha256 and size of the generated files of",
        "# the `tiny` profile (the static models/manifest.toml has no sha256 for them).",
        f'profile = "{PROFILE}"',
        f"generator_version = {GENERATOR_VERSION}",
        f"seed = {SEED}",
        "",
    ]
    for role, (name, data) in written.items():
        section = "mask" if role == "mask" else f"models.{role}"
        lines += [f"[{section}]", f'file = "{name}"', f'sha256 = "{sha256(data)}"', f"bytes = {len(data)}", ""]
    lock = "\n".join(lines).encode()
    (out / LOCK_FILE).write_bytes(lock)
    written["lock"] = (LOCK_FILE, lock)
    return written


# --------------------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------------------


def _load_manifest():
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover
        print("  skip  manifest.toml comparison (needs Python >= 3.11 for tomllib)")
        return None
    with open(HERE / "manifest.toml", "rb") as f:
        return tomllib.load(f)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
              "tensor(double)": "float64"}


def _declared(args):
    return [
        {"name": a.name, "dtype": _ORT_TYPES.get(a.type, a.type),
         "shape": [d if isinstance(d, int) else str(d) for d in a.shape]}
        for a in args
    ]


def _parse_lock(text: str) -> dict:
    """Read the lock file this script writes (tomllib when available, else a minimal parser)."""
    try:
        import tomllib

        return tomllib.loads(text)
    except ModuleNotFoundError:  # pragma: no cover
        doc: dict = {"models": {}}
        cur = doc
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                path = line.strip("[]").split(".")
                cur = doc
                for part in path:
                    cur = cur.setdefault(part, {})
                continue
            k, v = (x.strip() for x in line.split("=", 1))
            cur[k] = v.strip('"') if v.startswith('"') else int(v)
        return doc


def ddim_timesteps(steps: int, train: int = 1000, offset: int = 1) -> list:
    """diffusers DDIMScheduler 'leading' spacing."""
    ratio = train // steps
    return [int(t) + offset for t in (np.arange(steps) * ratio)[::-1]]


def smoke_pipeline(w, enc, u, dec, img, mel, steps, guidance, scale=0.18215):
    """Minimal numpy rendition of one chunk of the reference flow (docs/architecture.md §9.1, §9.3, §9.5),
    only to prove the four models compose; the real implementation is the Rust infer stage."""
    f = img.shape[0]
    hs = w.run(None, {"mel": mel})[0][0].transpose(1, 0, 2)  # (1500, 5, 384)
    t_pos = hs.shape[0]
    chunks = []
    for i in range(f):
        idx = np.clip(np.arange(2 * i - 4, 2 * i + 6), 0, t_pos - 1)
        chunks.append(hs[idx].reshape(AUDIO_TOKENS, AUDIO_DIM))
    audio = np.stack(chunks).astype(np.float32)  # (F, 50, 384)
    mask = gen_mask.render(img.shape[-1]).astype(np.float32) / 255.0
    mean_m, _ = enc.run(None, {"image": (img * mask).astype(np.float32)})
    mean_r, _ = enc.run(None, {"image": img})
    lat = mean_m.shape[-1]
    step = img.shape[-1] // lat
    mask_lat = mask[::step, ::step][None, None, None]  # nearest
    to5 = lambda x: x.transpose(1, 0, 2, 3)[None] * scale  # noqa: E731  (F,4,h,w) -> (1,4,F,h,w)
    cond = np.concatenate([np.broadcast_to(mask_lat, (1, 1, f, lat, lat)), to5(mean_m), to5(mean_r)], axis=1)
    rng = np.random.RandomState(SEED)
    x = np.repeat(rng.standard_normal((1, 4, 1, lat, lat)), f, axis=2).astype(np.float32)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas = np.cumprod(1.0 - betas)
    ts = ddim_timesteps(steps)
    for j, t in enumerate(ts):
        sample = np.concatenate([x, cond], axis=1).astype(np.float32)
        feeds = {"sample": np.concatenate([sample, sample]), "timestep": np.array([t], dtype=np.int64),
                 "encoder_hidden_states": np.concatenate([np.zeros_like(audio), audio])}
        eps_u, eps_c = u.run(None, feeds)[0]
        eps = eps_u + guidance * (eps_c - eps_u)
        a_t = alphas[t]
        a_prev = alphas[ts[j + 1]] if j + 1 < len(ts) else alphas[0]  # set_alpha_to_one = false
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)
    out = dec.run(None, {"latent": (x[0].transpose(1, 0, 2, 3) / scale).astype(np.float32)})[0]
    out = np.clip(out, -1, 1)
    return out * (1 - mask) + img * mask


def check_deepcache(u, full, shallow, feeds, expect, exact: bool, tol: float = 1e-5) -> dict:
    """The DeepCache pair against the plain UNet on the same inputs (CFG batch): the full step
    gives the plain noise_pred and a deep feature; the shallow step fed that feature at the
    same timestep gives the same noise_pred; at a later timestep it differs from a full step
    (an approximation) but stays finite. Shared with the exporter's check."""
    y = u.run(None, feeds)[0]
    y_full, deep = full.run(None, feeds)
    b, _, f, h, w = feeds["sample"].shape
    expect(deep.shape[0] == b and deep.shape[2:] == (f, h, w) and bool(np.isfinite(deep).all()),
           f"deep_feature {deep.shape} (B, C_deep, F, h, w), finite")
    rel = lambda a, r: float(np.abs(a - r).max() / (np.abs(r).max() + 1e-12))  # noqa: E731
    d_full = rel(y_full, y)
    expect(d_full == 0.0 if exact else d_full < tol, f"full step noise_pred == unet noise_pred (max rel. diff {d_full:.2e})")
    y_sh = shallow.run(None, dict(feeds, deep_feature=deep))[0]
    d_sh = rel(y_sh, y)
    expect(d_sh < tol, f"shallow step with the fresh deep feature == full step (max rel. diff {d_sh:.2e})")
    later = dict(feeds, timestep=np.array([int(feeds["timestep"][0]) - 50], dtype=np.int64))
    y_later = u.run(None, later)[0]
    y_sh_later = shallow.run(None, dict(later, deep_feature=deep))[0]
    d_approx = rel(y_sh_later, y_later)
    expect(bool(np.isfinite(y_sh_later).all()) and d_approx > 0.0,
           f"shallow step with a cached deep feature at t-50 approximates the full step (max rel. diff {d_approx:.2e})")
    return {"full": d_full, "shallow_same_t": d_sh, "shallow_cached": d_approx}


def check(out: Path) -> None:
    import onnxruntime as ort

    fails = []

    def expect(cond, msg):
        print(("  ok    " if cond else "  FAIL  ") + msg)
        if not cond:
            fails.append(msg)

    # files and lock
    lock_path = out / LOCK_FILE
    if not lock_path.exists():
        sys.exit(f"{lock_path} missing: run `python models/gen_tiny.py --out {out}` first")
    lock = _parse_lock(lock_path.read_text())
    print(f"lock file {lock_path}")
    for section in list(lock["models"].values()) + [lock["mask"]]:
        data = (out / section["file"]).read_bytes()
        expect(sha256(data) == section["sha256"] and len(data) == section["bytes"],
               f"{section['file']}: sha256 matches the lock")

    full = _load_manifest()
    manifest = None
    if full is not None:
        manifest = full["profiles"][PROFILE]
        print("manifest.toml")
        for name, prof in full["profiles"].items():
            same = all(prof["models"][r]["inputs"] == manifest["models"][r]["inputs"]
                       and prof["models"][r]["outputs"] == manifest["models"][r]["outputs"]
                       and prof["models"][r]["file"] == manifest["models"][r]["file"] for r in FILES)
            expect(same and set(prof["models"]) == set(FILES), f"profile {name}: same model contract as {PROFILE}")
        expect(manifest["resolution"] == RESOLUTION and manifest["mask"]["size"] == RESOLUTION,
               f"{PROFILE}: resolution {RESOLUTION}")
        mask_png = (out / MASK_FILE).read_bytes()
        expect(mask_png == gen_mask.png_bytes(gen_mask.render(manifest["mask"]["size"])),
               f"{MASK_FILE}: the {manifest['mask']['size']} px keep-mask")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = {}
    for role, name in FILES.items():
        m = onnx.load(str(out / name))
        expect(m.ir_version == IR_VERSION and m.opset_import[0].version == OPSET,
               f"{name}: IR {m.ir_version}, opset {m.opset_import[0].version}")
        s = ort.InferenceSession(str(out / name), opts, providers=["CPUExecutionProvider"])
        sess[role] = s
        if manifest is not None:
            spec = manifest["models"][role]
            expect(spec["file"] == name, f"{name}: manifest file name")
            expect(_declared(s.get_inputs()) == spec["inputs"], f"{name}: inputs match manifest.toml")
            expect(_declared(s.get_outputs()) == spec["outputs"], f"{name}: outputs match manifest.toml")

    rs = np.random.RandomState(0)
    finite = lambda a: bool(np.isfinite(a).all())  # noqa: E731

    print("whisper_encoder")
    w = sess["whisper_encoder"]
    mel = (rs.standard_normal((1, N_MELS, MEL_FRAMES)) * 0.5).astype(np.float32)
    h = w.run(None, {"mel": mel})[0]
    expect(h.shape == (1, AUDIO_LAYERS, AUDIO_POS, AUDIO_DIM) and h.dtype == np.float32, f"shape {h.shape}")
    expect(finite(h), f"finite (|max| {np.abs(h).max():.3g})")
    mel2 = mel.copy()
    mel2[:, :, 1000:1100] += 1.0
    h2 = w.run(None, {"mel": mel2})[0]
    expect(np.abs(h2 - h).max() > 1e-3, "changing the mel changes hidden_states")
    expect(np.abs(h2 - h)[:, :, :400].max() < 1e-6 and np.abs(h2 - h)[:, :, 500:550].max() > 1e-3,
           "the change is local in time (positions 500..550 only)")
    expect(all(np.abs(h[0, i] - h[0, i + 1]).max() > 1e-3 for i in range(4)), "the 5 layers differ")

    print("vae_encoder / vae_decoder")
    enc, dec = sess["vae_encoder"], sess["vae_decoder"]
    for n in (1, 16):
        img = rs.uniform(-1, 1, (n, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
        mean, logvar = enc.run(None, {"image": img})
        lat = RESOLUTION // 8
        expect(mean.shape == logvar.shape == (n, LATENT_C, lat, lat), f"N={n}: encoder shapes {mean.shape}")
        expect(finite(mean) and finite(logvar) and logvar.min() >= -30 and logvar.max() <= 20,
               f"N={n}: finite, logvar in [-30,20] (mean |max| {np.abs(mean).max():.3g})")
        z = (mean + np.exp(0.5 * logvar) * rs.standard_normal(mean.shape)).astype(np.float32)
        out_img = dec.run(None, {"latent": z})[0]
        expect(out_img.shape == (n, 3, RESOLUTION, RESOLUTION), f"N={n}: decoder shape {out_img.shape}")
        expect(finite(out_img) and out_img.min() >= -1 and out_img.max() <= 1, f"N={n}: decoder output in [-1,1]")
    img = rs.uniform(-1, 1, (2, 3, 512, 384)).astype(np.float32)
    mean = enc.run(None, {"image": img})[0]
    expect(mean.shape == (2, 4, 64, 48), f"non-square 512x384: encoder {mean.shape}")
    expect(dec.run(None, {"latent": mean})[0].shape == (2, 3, 512, 384), "non-square decoder")

    print("unet")
    u = sess["unet"]
    lat = RESOLUTION // 8

    def unet_inputs(b, f):
        return {
            "sample": rs.standard_normal((b, UNET_IN_C, f, lat, lat)).astype(np.float32),
            "timestep": np.array([951], dtype=np.int64),
            "encoder_hidden_states": rs.standard_normal((b * f, AUDIO_TOKENS, AUDIO_DIM)).astype(np.float32),
        }

    for b, f in ((1, 16), (1, 2), (2, 16), (2, 5), (1, 1)):
        feeds = unet_inputs(b, f)
        y = u.run(None, feeds)[0]
        expect(y.shape == (b, LATENT_C, f, lat, lat) and finite(y),
               f"B={b} F={f}: noise_pred {y.shape}, finite (std {y.std():.3g})")
    feeds = unet_inputs(1, 16)
    y = u.run(None, feeds)[0]
    f2 = dict(feeds, encoder_hidden_states=feeds["encoder_hidden_states"] * 0.5 + 0.3)
    expect(np.abs(u.run(None, f2)[0] - y).mean() > 1e-3, "changing the audio embeds changes noise_pred")
    f3 = dict(feeds, encoder_hidden_states=np.zeros_like(feeds["encoder_hidden_states"]))
    expect(np.abs(u.run(None, f3)[0] - y).mean() > 1e-3, "all-zero audio (CFG uncond) differs from cond")
    ehs = feeds["encoder_hidden_states"].copy()
    ehs[3] = rs.standard_normal(ehs[3].shape)
    d = np.abs(u.run(None, dict(feeds, encoder_hidden_states=ehs))[0] - y).mean(axis=(0, 1, 3, 4))
    expect(int(d.argmax()) == 3, f"audio row f=3 acts mostly on frame 3 (per-frame change {d.argmax()})")
    f4 = dict(feeds, timestep=np.array([1], dtype=np.int64))
    expect(np.abs(u.run(None, f4)[0] - y).mean() > 1e-3, "changing the timestep changes noise_pred")
    s2 = feeds["sample"].copy()
    s2[:, 12] += 1.0  # reference latents
    expect(np.abs(u.run(None, dict(feeds, sample=s2))[0] - y).mean() > 1e-3, "the reference channels matter")
    # CFG batch: row order b*F+f; batch item 1 must equal a B=1 run with the second half
    cfg = {
        "sample": np.concatenate([feeds["sample"], feeds["sample"]]),
        "timestep": feeds["timestep"],
        "encoder_hidden_states": np.concatenate([np.zeros_like(feeds["encoder_hidden_states"]),
                                                 feeds["encoder_hidden_states"]]),
    }
    yc = u.run(None, cfg)[0]
    expect(np.allclose(yc[1], y[0], atol=1e-5), "B=2 (CFG) batch item 1 == B=1 run (rows are b*F+f)")

    # quantify: audio effect relative to the output scale
    rel = np.abs(u.run(None, f2)[0] - y).mean() / np.abs(y).mean()
    expect(rel > 0.05, f"audio effect is substantial ({rel:.1%} of mean |noise_pred|)")

    print("DeepCache graphs")
    check_deepcache(sess["unet"], sess["unet_deepcache_full"], sess["unet_deepcache_shallow"],
                    cfg, expect, exact=True)

    print("ddim_step")
    check_ddim_step(sess["ddim_step"], expect, rs, lat)

    print("end to end (whisper -> vae -> 20 DDIM steps with CFG 1.5 -> vae), F=5")
    expect(ddim_timesteps(20) == list(range(951, 0, -50)), "DDIM leading spacing + offset 1: 951, 901, ..., 1")
    img = np.clip(rs.standard_normal((5, 3, RESOLUTION, RESOLUTION)) * 0.5, -1, 1).astype(np.float32)
    decoded = smoke_pipeline(w, enc, u, dec, img, mel, steps=20, guidance=1.5)
    expect(decoded.shape == img.shape and finite(decoded), f"decoded crops {decoded.shape}, finite")

    print("timings (CPU, 1 thread, median of 5)")

    def timed(s, f):
        s.run(None, f)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            s.run(None, f)
            runs.append((time.perf_counter() - t0) * 1000)
        return sorted(runs)[2]

    ms = timed(u, feeds)
    print(f"  info  unet step B=1 F=16 h=w={lat}: {ms:.1f} ms")
    print(f"  info  unet step B=2 (CFG) F=16 h=w={lat}: {timed(u, cfg):.1f} ms")
    y_full, deep = sess["unet_deepcache_full"].run(None, cfg)
    print(f"  info  DeepCache full step B=2 F=16: {timed(sess['unet_deepcache_full'], cfg):.1f} ms, "
          f"shallow step: {timed(sess['unet_deepcache_shallow'], dict(cfg, deep_feature=deep)):.1f} ms")
    print(f"  info  whisper_encoder one 30 s window: {timed(w, {'mel': mel}):.1f} ms")
    img16 = rs.uniform(-1, 1, (16, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
    print(f"  info  vae_encoder N=16 {RESOLUTION} px: {timed(enc, {'image': img16}):.1f} ms")
    z16 = rs.standard_normal((16, LATENT_C, lat, lat)).astype(np.float32)
    print(f"  info  vae_decoder N=16 {RESOLUTION} px: {timed(dec, {'latent': z16}):.1f} ms")
    if ms > 100:
        print("  WARN  unet step slower than 100 ms")

    if fails:
        sys.exit(f"{len(fails)} check(s) failed")
    print("all checks passed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Generate or check the tiny random-weight model profile.")
    p.add_argument("--out", type=Path, default=HERE / "generated" / PROFILE, help="output directory")
    p.add_argument("--check", action="store_true", help="verify an existing profile with onnxruntime")
    a = p.parse_args(argv)
    if a.check:
        check(a.out)
        return 0
    t0 = time.perf_counter()
    written = generate(a.out)
    for name, data in written.values():
        print(f"{sha256(data)}  {a.out / name}  ({len(data)} bytes)")
    print(f"generated profile '{PROFILE}' in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
