#!/usr/bin/env python3
"""Export LatentSync 1.5 / 1.6 to the ONNX contract of models/manifest.toml.

  python models/export/export.py --profile latentsync-1.5 --latentsync-src DIR \
      --unet-ckpt latentsync_unet.pt --whisper-ckpt tiny.pt --vae-weights diffusion_pytorch_model.safetensors \
      [--precision fp32|fp16] [--out models/generated/latentsync-1.5]

  python models/export/export.py --profile latentsync-1.5 --latentsync-src DIR --random-weights \
      [--out /tmp/ls-check]     # the real architectures with seeded random weights, then a smoke run

Writes into --out: whisper_encoder.onnx, vae_encoder.onnx, vae_decoder.onnx, unet.onnx (+ its
external data file unet.onnx.data, the UNet is > 2 GB in fp32), the DeepCache pair,
ddim_step.onnx (one DDIM step on the execution provider, no weights: models/gen_tiny.py's
graph, the same in every profile; `--only ddim_step` adds it to an existing export without
torch), mask.png and
manifest.lock.toml (sha256 + bytes, the format of models/gen_tiny.py; the UNet's external
data file is listed under [external_data.unet]). Afterwards every graph is checked against
manifest.toml (names, dtypes, shapes) with ONNX Runtime; with --random-weights (or --smoke)
one Whisper call, one VAE encode/decode and one UNet step (B=1, F=2) also run on CPU and,
for fp32, are compared with the PyTorch modules they came from.

The LatentSync source is imported from --latentsync-src (a checkout of
github.com/bytedance/LatentSync); none of it is copied here. Two of its modules pull heavy
dependencies that exporting does not need (latentsync/utils/util.py: cv2, decord,
matplotlib; the vendored whisper package: ffmpeg, transformers); they are replaced by stubs
for the import only, the model classes themselves are LatentSync's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import math
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent
sys.path.insert(0, str(MODELS))
import gen_mask  # noqa: E402
import gen_tiny  # noqa: E402  (manifest/lock helpers of the tiny generator)

OPSET = 17
EXPORTER_VERSION = 1
UNET_CONFIGS = {"latentsync-1.5": "stage2.yaml", "latentsync-1.6": "stage2_512.yaml"}
RESOLUTIONS = {"latentsync-1.5": 256, "latentsync-1.6": 512}
FILES = dict(gen_tiny.FILES)
DEEPCACHE_ROLES = gen_tiny.DEEPCACHE_ROLES
UNET_DATA = "unet.onnx.data"
# Graphs over 2 GB, saved with ONNX external data: role -> data file next to the graph.
EXTERNAL_DATA = {"unet": UNET_DATA, "unet_deepcache_full": "unet_deepcache_full.onnx.data"}
# DeepCache as the reference runs it (scripts/inference.py: DeepCacheSDHelper with
# cache_interval=3, cache_branch_id=0): on a cached step every UNet block is skipped except
# conv_in, the last layer (resnet, attention, motion module) of the last up block and the
# output head; that layer's input from the deep path is the cached one.
DEEPCACHE_INTERVAL, DEEPCACHE_BRANCH = 3, 0
MASK_FILE = gen_tiny.MASK_FILE
LOCK_FILE = gen_tiny.LOCK_FILE

# stabilityai/sd-vae-ft-mse config.json (the hub is not needed to build the architecture).
SD_VAE_FT_MSE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)
# openai-whisper "tiny" dimensions (LatentSync's checkpoints/whisper/tiny.pt).
WHISPER_TINY_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                         n_vocab=51865, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)


def log(msg: str) -> None:
    print(msg, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# LatentSync imports
# --------------------------------------------------------------------------------------------


def import_latentsync(src: Path):
    """Make LatentSync's model classes importable from a checkout without its heavy deps."""
    if not (src / "latentsync" / "models" / "unet.py").exists():
        sys.exit(f"--latentsync-src {src}: no latentsync/models/unet.py (not a LatentSync checkout)")
    sys.path.insert(0, str(src))
    # unet.py only needs util.zero_rank_log from latentsync/utils/util.py
    util = types.ModuleType("latentsync.utils.util")
    util.zero_rank_log = lambda logger, message: logger.info(message)
    sys.modules["latentsync.utils.util"] = util
    # the vendored whisper package's __init__ imports ffmpeg/transformers/tqdm; load model.py alone
    pkg = types.ModuleType("_ls_whisper")
    pkg.__path__ = [str(src / "latentsync" / "whisper" / "whisper")]
    sys.modules["_ls_whisper"] = pkg
    stubs = {"transcribe": ["transcribe"], "decoding": ["detect_language", "decode"]}
    for name, attrs in stubs.items():
        m = types.ModuleType(f"_ls_whisper.{name}")
        for a in attrs:
            setattr(m, a, None)
        sys.modules[m.__name__] = m
    whisper_model = importlib.import_module("_ls_whisper.model")
    unet_mod = importlib.import_module("latentsync.models.unet")
    return whisper_model, unet_mod


# --------------------------------------------------------------------------------------------
# Modules to export
# --------------------------------------------------------------------------------------------


def build_modules(args, whisper_model, unet_mod):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class WhisperHidden(nn.Module):
        """AudioEncoder.forward(include_embeddings=True) as LatentSync uses it: the conv +
        positional embedding output and each block output (no ln_post), stacked on axis 1."""

        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, mel):
            e = self.enc
            x = F.gelu(e.conv1(mel))
            x = F.gelu(e.conv2(x)).permute(0, 2, 1)
            x = x + e.positional_embedding
            states = [x]
            for block in e.blocks:
                x = block(x)
                states.append(x)
            return torch.stack(states, dim=1)

    class VaeEncoder(nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, image):
            moments = self.vae.quant_conv(self.vae.encoder(image))
            mean, logvar = torch.chunk(moments, 2, dim=1)
            return mean, torch.clamp(logvar, -30.0, 20.0)  # DiagonalGaussianDistribution

    class VaeDecoder(nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decoder(self.vae.post_quant_conv(latent))

    class Unet(nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample

    class UnetDeepCacheFull(nn.Module):
        """The unchanged UNet step, plus the deep feature DeepCache caches at branch 0: the
        hidden state that enters the last layer of the last up block from below, before it is
        concatenated with conv_in's skip (captured by a pre-hook on that layer's resnet)."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            last = self.unet.up_blocks[-1]
            skip_c = self.unet.conv_in.out_channels
            seen = {}

            def grab(_mod, args):
                x = args[0]
                seen["deep"] = x[:, : x.shape[1] - skip_c]

            hook = last.resnets[-1].register_forward_pre_hook(grab)
            try:
                eps = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
            finally:
                hook.remove()
            return eps, seen["deep"]

    class UnetDeepCacheShallow(nn.Module):
        """What a cached DeepCache step computes: time embedding, conv_in, the last layer of
        the last up block on [cached deep feature | conv_in output], and the output head.
        Calls LatentSync's own submodules in the order of its UNet forward."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, deep_feature):
            u = self.unet
            emb = u.time_embedding(u.time_proj(timestep.expand(sample.shape[0])).to(dtype=u.dtype))
            x = torch.cat([deep_feature, u.conv_in(sample)], dim=1)
            last = u.up_blocks[-1]
            x = last.resnets[-1](x, emb)
            x = last.attentions[-1](x, encoder_hidden_states=encoder_hidden_states).sample
            if last.motion_modules[-1] is not None:
                x = last.motion_modules[-1](x, emb, encoder_hidden_states=encoder_hidden_states)
            return u.conv_out(u.conv_act(u.conv_norm_out(x)))

    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf

    torch.manual_seed(args.seed)
    mods = {}
    roles = set(args.only or FILES)

    # Whisper tiny encoder
    dims = whisper_model.ModelDimensions(**WHISPER_TINY_DIMS)
    enc = whisper_model.AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state,
                                     dims.n_audio_head, dims.n_audio_layer)
    if not args.random_weights and "whisper_encoder" in roles:
        ck = torch.load(args.whisper_ckpt, map_location="cpu", weights_only=True)
        if "dims" in ck and {k: ck["dims"].get(k) for k in WHISPER_TINY_DIMS} != WHISPER_TINY_DIMS:
            sys.exit(f"{args.whisper_ckpt}: not whisper tiny: dims {ck['dims']}")
        sd = ck.get("model_state_dict", ck)
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        strict_load(enc, sd, args.whisper_ckpt)
    mods["whisper_encoder"] = WhisperHidden(enc.eval())

    # sd-vae-ft-mse
    vae = AutoencoderKL(**SD_VAE_FT_MSE_CONFIG)
    if not args.random_weights and roles & {"vae_encoder", "vae_decoder"}:
        p = Path(args.vae_weights)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        strict_load(vae, sd, p)
    vae.eval()
    mods["vae_encoder"] = VaeEncoder(vae)
    mods["vae_decoder"] = VaeDecoder(vae)
    if not roles & {"unet", *DEEPCACHE_ROLES}:
        return mods

    # LatentSync UNet3DConditionModel from the checkout's stage-2 config
    cfg_path = Path(args.latentsync_src) / "configs" / "unet" / UNET_CONFIGS[args.profile]
    cfg = OmegaConf.load(cfg_path)
    if cfg.data.resolution != RESOLUTIONS[args.profile]:
        sys.exit(f"{cfg_path}: resolution {cfg.data.resolution}, expected {RESOLUTIONS[args.profile]}")
    unet = unet_mod.UNet3DConditionModel.from_config(OmegaConf.to_container(cfg.model))
    n_motion = sum(1 for n, _ in unet.named_parameters() if "motion_modules." in n)
    if n_motion == 0:
        sys.exit(f"{cfg_path}: the UNet has no motion-module (temporal) parameters")
    if args.random_weights:
        # zero-initialised layers (motion-module outputs, ...) would make the temporal path a
        # no-op: give every all-zero weight small random values so all paths carry signal
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for _, prm in unet.named_parameters():
                if prm.dim() > 1 and not prm.any():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    else:
        ck = torch.load(args.unet_ckpt, map_location="cpu", weights_only=True)
        strict_load(unet, ck.get("state_dict", ck), args.unet_ckpt)
        del ck
    log(f"unet: {cfg_path.name}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters "
        f"({n_motion} motion-module tensors)")
    unet.eval()
    mods["unet"] = Unet(unet)
    mods["unet_deepcache_full"] = UnetDeepCacheFull(unet)
    mods["unet_deepcache_shallow"] = UnetDeepCacheShallow(unet)
    return mods


def strict_load(module, state_dict, source) -> None:
    """load_state_dict that fails naming every missing / unexpected key (the reference loads
    the UNet with strict=False, which silently drops temporal layers under a wrong config)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or bad_shape:
        lines = [f"{source}: does not match the {type(module).__name__} architecture:"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)):
            if keys:
                lines.append(f"  {len(keys)} {what}:")
                lines += [f"    {k}" for k in keys]
        sys.exit("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def example_inputs(role, torch):
    g = torch.Generator().manual_seed(0)
    if role == "whisper_encoder":
        return (torch.randn(1, 80, 3000, generator=g) * 0.5,)
    if role == "vae_encoder":  # distinct N/H/W so no symbolic size is baked as a constant
        return (torch.rand(2, 3, 64, 48, generator=g) * 2 - 1,)
    if role == "vae_decoder":
        return (torch.randn(2, 4, 8, 6, generator=g),)
    # unet: B=2, F=3, h=16, w=24 at trace time; checked later with B=1, F=2, h=w=32
    b, f, h, w = 2, 3, 16, 24
    args = (torch.randn(b, 13, f, h, w, generator=g), torch.tensor([951], dtype=torch.int64),
            torch.randn(b * f, 50, 384, generator=g))
    if role == "unet_deepcache_shallow":  # 320 channels: block_out_channels[0] of every config
        args += (torch.randn(b, 320, f, h, w, generator=g),)
    return args


DYNAMIC = {
    "whisper_encoder": {},
    "vae_encoder": {"image": {0: "N", 2: "H", 3: "W"}, "latent_mean": {0: "N", 2: "H/8", 3: "W/8"},
                    "latent_logvar": {0: "N", 2: "H/8", 3: "W/8"}},
    "vae_decoder": {"latent": {0: "N", 2: "h", 3: "w"}, "image": {0: "N", 2: "8*h", 3: "8*w"}},
    "unet": {"sample": {0: "B", 2: "F", 3: "h", 4: "w"}, "encoder_hidden_states": {0: "B*F"},
             "noise_pred": {0: "B", 2: "F", 3: "h", 4: "w"}},
}
_DEEP = {"deep_feature": {0: "B", 2: "F", 3: "h", 4: "w"}}
DYNAMIC["unet_deepcache_full"] = {**DYNAMIC["unet"], **_DEEP}
DYNAMIC["unet_deepcache_shallow"] = {**DYNAMIC["unet"], **_DEEP}


def set_io(model, spec) -> None:
    """Write the manifest's names/shapes onto the graph's inputs and outputs verbatim."""
    for values, want in ((model.graph.input, spec["inputs"]), (model.graph.output, spec["outputs"])):
        assert [v.name for v in values] == [w["name"] for w in want], ([v.name for v in values], want)
        for v, w in zip(values, want):
            dims = v.type.tensor_type.shape.dim
            assert len(dims) == len(w["shape"]), (v.name, len(dims), w["shape"])
            for d, s in zip(dims, w["shape"]):
                if isinstance(s, int):
                    d.ClearField("dim_param")
                    d.dim_value = s
                else:
                    d.ClearField("dim_value")
                    d.dim_param = s


def toposort(graph) -> None:
    """Stable topological sort of graph.node (the ONNX checker requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or dangling inputs: {rest[0].name}")
        pending = rest
    nodes = [type(n)() for n in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


def export_one(role, module, spec, out: Path, precision: str, props: dict) -> dict:
    import onnx
    import torch

    t0 = time.time()
    args = example_inputs(role, torch)
    names_in = [i["name"] for i in spec["inputs"]]
    names_out = [o["name"] for o in spec["outputs"]]
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(module, args, str(tmp_path), input_names=names_in, output_names=names_out,
                              dynamic_axes=DYNAMIC[role] or None, opset_version=OPSET, do_constant_folding=True)
        t_export = time.time() - t0
        model = onnx.load(str(tmp_path))  # pulls in external data when torch wrote any
    set_io(model, spec)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # float32 at the boundary, Casts inside (manifest convention)
        # Resize's roi/scales must stay float32: keep the Constant nodes feeding them as they are
        producer = {o: n for n in model.graph.node for o in n.output}
        keep = sorted({producer[i].name for n in model.graph.node if n.op_type == "Resize"
                       for i in n.input[1:] if i in producer and producer[i].op_type == "Constant"})
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True, node_block_list=keep)
        toposort(model.graph)  # the converter appends its input Casts at the end
        set_io(model, spec)
    model.producer_name = "lipsync/models/export/export.py"
    model.producer_version = str(EXPORTER_VERSION)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    path = out / FILES[role]
    data = EXTERNAL_DATA.get(role)
    if data is None and model.ByteSize() > 1_900_000_000:
        sys.exit(f"{role}: graph over 2 GB without an external-data file name")
    for stale in (path, out / data if data else None):
        if stale is not None and stale.exists():
            stale.unlink()
    if data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # path form: works with external data
    if data:
        os.chmod(out / data, 0o644)  # onnx writes it 0600; the service may run as another user
    dt = time.time() - t0
    sizes = {path.name: path.stat().st_size}
    if data:
        sizes[data] = (out / data).stat().st_size
    log(f"  {role}: exported in {dt:.1f} s (trace+export {t_export:.1f} s), "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    return {"seconds": dt, "sizes": sizes}


def write_ddim_step(out: Path, profile: str, precision: str, random_weights: bool) -> None:
    """The DDIM step graph (no weights; float32 at the boundary and f64 inside whatever the
    UNet's precision: it is a handful of element-wise operations on the latents)."""
    import onnx

    model = gen_tiny.build_ddim_step()
    model.producer_name = "lipsync/models/export/export.py"
    model.producer_version = str(EXPORTER_VERSION)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"lipsync.profile": profile, "lipsync.precision": precision,
                                        "lipsync.random_weights": str(bool(random_weights)).lower()})
    onnx.checker.check_model(model, full_check=True)
    path = out / FILES["ddim_step"]
    onnx.save_model(model, str(path))
    log(f"  ddim_step: written ({path.stat().st_size} bytes, gen_tiny.build_ddim_step)")


def write_mask(out: Path, size: int, src: Path | None) -> str:
    """The reference's latentsync/utils/mask.png from the checkout (resized like gen_mask.py
    does, Lanczos-4) when it is there, else gen_mask.py's procedural redraw."""
    ref = src / "latentsync" / "utils" / "mask.png" if src else None
    if ref is not None and ref.exists():
        from PIL import Image  # a diffusers dependency

        img = np.asarray(Image.open(ref).convert("L"), dtype=np.float64)
        if img.shape != (size, size):
            a = gen_mask._lanczos4_matrix(size, img.shape[0])
            b = gen_mask._lanczos4_matrix(size, img.shape[1])
            img = a @ img @ b.T
        img = np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8)
        (out / MASK_FILE).write_bytes(gen_mask.png_bytes(img))
        same = np.array_equal(img, gen_mask.render(size))
        diff = int(np.abs(img.astype(int) - gen_mask.render(size).astype(int)).max())
        return (f"copied from {ref}, {size} px (Lanczos-4); "
                f"{'identical to' if same else f'max {diff} grey levels from'} gen_mask.py's redraw")
    (out / MASK_FILE).write_bytes(gen_mask.png_bytes(gen_mask.render(size)))
    return f"procedural (models/gen_mask.py, {size} px)"


def write_lock(out: Path, profile: str, precision: str, args) -> None:
    lines = [
        "# Written by models/export/export.py; do not edit. sha256 and size of the exported files of",
        f"# the `{profile}` profile (the static models/manifest.toml has no sha256 for them).",
        f'profile = "{profile}"',
        f"generator_version = {EXPORTER_VERSION}",
        f'precision = "{precision}"',
        f"random_weights = {'true' if args.random_weights else 'false'}",
        f"seed = {args.seed}",
        "",
    ]
    entries = [(f"models.{r}", f) for r, f in FILES.items()] + [("mask", MASK_FILE)]
    for role, data in EXTERNAL_DATA.items():
        if (out / data).exists():
            entries.append((f"external_data.{role}", data))
    for section, name in entries:
        p = out / name
        lines += [f"[{section}]", f'file = "{name}"', f'sha256 = "{sha256_file(p)}"', f"bytes = {p.stat().st_size}", ""]
    (out / LOCK_FILE).write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------------------


def check(out: Path, profile: str, precision: str, mods=None, smoke: bool = True, threads: int = 2) -> list:
    """Lock sha256s, manifest contract, and (smoke) one run of each graph on CPU. With the
    PyTorch modules at hand (fp32), the ONNX outputs are compared with them."""
    import onnxruntime as ort

    fails = []

    def expect(cond, msg):
        log(("  ok    " if cond else "  FAIL  ") + msg)
        if not cond:
            fails.append(msg)

    lock = gen_tiny._parse_lock((out / LOCK_FILE).read_text())
    sections = list(lock["models"].values()) + [lock["mask"]] + list(lock.get("external_data", {}).values())
    for sec in sections:
        p = out / sec["file"]
        expect(p.stat().st_size == sec["bytes"] and sha256_file(p) == sec["sha256"], f"{sec['file']}: sha256 matches the lock")
    manifest = gen_tiny._load_manifest()["profiles"][profile]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = {}
    for role, name in FILES.items():
        t0 = time.time()
        if role in DEEPCACHE_ROLES and not (out / name).exists():
            log(f"  note  {name}: absent (infer.deepcache_interval must stay 0 with this export)")
            continue
        try:
            s = ort.InferenceSession(str(out / name), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            expect(False, f"{name}: loads in ONNX Runtime {ort.__version__} CPU ({str(e).splitlines()[0][:200]})")
            continue
        sess[role] = s
        spec = manifest["models"][role]
        expect(spec["file"] == name, f"{name}: manifest file name")
        expect(gen_tiny._declared(s.get_inputs()) == spec["inputs"], f"{name}: inputs match manifest.toml")
        expect(gen_tiny._declared(s.get_outputs()) == spec["outputs"], f"{name}: outputs match manifest.toml")
        log(f"        session created in {time.time() - t0:.1f} s")
        if role in DEEPCACHE_ROLES:
            del sess[role], s  # loaded again for their own check below: keep one UNet in memory
    if "ddim_step" in sess:  # cheap: always
        log("ddim_step")
        gen_tiny.check_ddim_step(sess["ddim_step"], expect, np.random.RandomState(0), RESOLUTIONS[profile] // 8)
    if not smoke or any(r not in sess for r in FILES if r not in DEEPCACHE_ROLES):
        return fails

    import torch

    res = RESOLUTIONS[profile]
    lat = res // 8
    rs = np.random.RandomState(0)
    finite = lambda a: bool(np.isfinite(a).all())  # noqa: E731
    tol = 2e-3 if precision == "fp32" else None

    def compare(name, got, ref):
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        if tol is None:
            log(f"        {name}: max rel. diff vs PyTorch fp32 {err:.2e} (fp16, not asserted)")
        else:
            expect(err < tol, f"{name}: matches PyTorch (max |diff| / max |ref| = {err:.2e})")

    mel = (rs.standard_normal((1, 80, 3000)) * 0.5).astype(np.float32)
    t0 = time.time()
    h = sess["whisper_encoder"].run(None, {"mel": mel})[0]
    log(f"whisper_encoder: {time.time() - t0:.2f} s")
    expect(h.shape == (1, 5, 1500, 384) and finite(h), f"hidden_states {h.shape}, finite")
    if mods:
        with torch.no_grad():
            _, emb = mods["whisper_encoder"].enc(torch.from_numpy(mel), include_embeddings=True)
        compare("whisper vs AudioEncoder(include_embeddings=True)", h, emb)

    img = rs.uniform(-1, 1, (1, 3, res, res)).astype(np.float32)
    t0 = time.time()
    mean, logvar = sess["vae_encoder"].run(None, {"image": img})
    log(f"vae_encoder N=1 {res}px: {time.time() - t0:.2f} s")
    expect(mean.shape == logvar.shape == (1, 4, lat, lat) and finite(mean) and finite(logvar)
           and logvar.min() >= -30 and logvar.max() <= 20, f"latent {mean.shape}, finite, logvar clamped")
    t0 = time.time()
    dec = sess["vae_decoder"].run(None, {"latent": mean})[0]
    log(f"vae_decoder N=1 {lat}x{lat}: {time.time() - t0:.2f} s")
    expect(dec.shape == (1, 3, res, res) and finite(dec), f"decoded {dec.shape}, finite")
    if mods:
        with torch.no_grad():
            m_ref, lv_ref = mods["vae_encoder"](torch.from_numpy(img))
            d_ref = mods["vae_decoder"](torch.from_numpy(mean))
        compare("vae_encoder mean", mean, m_ref.numpy())
        compare("vae_encoder logvar", logvar, lv_ref.numpy())
        compare("vae_decoder", dec, d_ref.numpy())

    b, f = 1, 2
    sample = rs.standard_normal((b, 13, f, lat, lat)).astype(np.float32)
    ehs = rs.standard_normal((b * f, 50, 384)).astype(np.float32)
    feeds = {"sample": sample, "timestep": np.array([951], dtype=np.int64), "encoder_hidden_states": ehs}
    u = sess["unet"]
    u.run(None, feeds)  # warm-up
    t0 = time.time()
    eps = u.run(None, feeds)[0]
    step = time.time() - t0
    log(f"unet one step B=1 F=2 {lat}x{lat}: {step:.2f} s on CPU ({threads} threads)")
    expect(eps.shape == (b, 4, f, lat, lat) and finite(eps), f"noise_pred {eps.shape}, finite")
    feeds2 = dict(feeds, encoder_hidden_states=np.zeros_like(ehs))
    expect(np.abs(u.run(None, feeds2)[0] - eps).max() > 1e-4, "audio embeds change the output")
    s2 = sample.copy()
    s2[:, :, 1] += 1.0  # change frame 1 only
    e2 = u.run(None, dict(feeds, sample=s2))[0]
    expect(np.abs(e2[:, :, 0] - eps[:, :, 0]).max() > 1e-5, "frame 1's input changes frame 0's output (temporal layers)")
    f3 = 3
    e3 = u.run(None, {"sample": rs.standard_normal((1, 13, f3, lat, lat)).astype(np.float32),
                      "timestep": np.array([1], dtype=np.int64),
                      "encoder_hidden_states": rs.standard_normal((f3, 50, 384)).astype(np.float32)})[0]
    expect(e3.shape == (1, 4, f3, lat, lat), f"F dynamic: F={f3} gives {e3.shape}")
    if mods:
        with torch.no_grad():
            ref = mods["unet"](torch.from_numpy(sample), torch.tensor([951]), torch.from_numpy(ehs)).numpy()
        compare("unet", eps, ref)
    check.step_seconds = step
    if all((out / FILES[r]).exists() for r in DEEPCACHE_ROLES):
        del sess["unet"], u
        check_deepcache(out, opts, feeds, eps, step, mods, expect, compare)
    return fails


def check_deepcache(out: Path, opts, feeds, eps, exact_step: float, mods, expect, compare) -> None:
    """The DeepCache pair on the inputs of the UNet check: the full graph's noise_pred equals
    the plain UNet's; the shallow graph, fed the full graph's deep feature at the next
    timestep with a new sample, equals LatentSync's UNet run under the reference's DeepCache
    helper (DeepCacheSDHelper, cache_interval=3, cache_branch_id=0) for the same two calls."""
    import onnxruntime as ort
    import torch

    log("deepcache: full and shallow graphs")
    t0 = time.time()
    full = ort.InferenceSession(str(out / FILES["unet_deepcache_full"]), opts, providers=["CPUExecutionProvider"])
    log(f"        full graph session created in {time.time() - t0:.1f} s")
    full.run(None, feeds)  # warm-up
    t0 = time.time()
    eps_full, deep = full.run(None, feeds)
    t_full = time.time() - t0
    del full
    b, _, f, h, w = feeds["sample"].shape
    expect(deep.shape[0] == b and deep.shape[2:] == (f, h, w) and bool(np.isfinite(deep).all()),
           f"deep_feature {deep.shape}, finite")
    d = float(np.abs(eps_full - eps).max() / (np.abs(eps).max() + 1e-12))
    expect(d < 1e-5, f"full graph noise_pred == unet graph noise_pred (max rel. diff {d:.2e})")
    rs = np.random.RandomState(1)
    step2 = dict(feeds, sample=rs.standard_normal(feeds["sample"].shape).astype(np.float32),
                 timestep=np.array([901], dtype=np.int64), deep_feature=deep)
    shallow = ort.InferenceSession(str(out / FILES["unet_deepcache_shallow"]), opts,
                                   providers=["CPUExecutionProvider"])
    shallow.run(None, step2)
    t0 = time.time()
    eps_sh = shallow.run(None, step2)[0]
    t_sh = time.time() - t0
    del shallow
    expect(eps_sh.shape == eps.shape and bool(np.isfinite(eps_sh).all()), f"shallow noise_pred {eps_sh.shape}, finite")
    log(f"unet step B={b} F={f}: exact {exact_step:.2f} s; DeepCache full {t_full:.2f} s, shallow {t_sh:.2f} s; "
        f"mean per step at interval {DEEPCACHE_INTERVAL}: "
        f"{(t_full + (DEEPCACHE_INTERVAL - 1) * t_sh) / DEEPCACHE_INTERVAL:.2f} s "
        f"({exact_step / ((t_full + (DEEPCACHE_INTERVAL - 1) * t_sh) / DEEPCACHE_INTERVAL):.2f}x)")
    if not mods:
        return
    from types import SimpleNamespace

    from DeepCache import DeepCacheSDHelper

    unet = mods["unet"].unet
    pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=torch.tensor([951, 901, 851])))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=DEEPCACHE_INTERVAL, cache_branch_id=DEEPCACHE_BRANCH)
    helper.enable()
    ehs = torch.from_numpy(feeds["encoder_hidden_states"])
    try:
        with torch.no_grad():
            ref0 = unet(torch.from_numpy(feeds["sample"]), torch.tensor([951]), encoder_hidden_states=ehs).sample
            ref1 = unet(torch.from_numpy(step2["sample"]), torch.tensor([901]), encoder_hidden_states=ehs).sample
    finally:
        helper.disable()
    compare("deepcache full step vs the helper's first (full) call", eps_full, ref0.numpy())
    compare("deepcache shallow step vs the helper's second (cached) call", eps_sh, ref1.numpy())
    with torch.no_grad():
        exact1 = unet(torch.from_numpy(step2["sample"]), torch.tensor([901]), encoder_hidden_states=ehs).sample
    approx = float((ref1 - exact1).abs().max() / (exact1.abs().max() + 1e-12))
    log(f"        (a cached step vs the exact step at t=901: max rel. diff {approx:.2e}; random weights)")


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(UNET_CONFIGS), default="latentsync-1.5")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--latentsync-src", required=True, type=Path, help="LatentSync checkout")
    ap.add_argument("--out", type=Path, help="default: models/generated/<profile>")
    ap.add_argument("--random-weights", action="store_true", help="seeded random weights, no checkpoints")
    ap.add_argument("--seed", type=int, default=1247)
    ap.add_argument("--unet-ckpt", help="latentsync_unet.pt")
    ap.add_argument("--whisper-ckpt", help="whisper/tiny.pt")
    ap.add_argument("--vae-weights", help="sd-vae-ft-mse diffusion_pytorch_model.safetensors (or .bin)")
    ap.add_argument("--only", nargs="+", choices=list(FILES), help="export only these roles (debugging)")
    ap.add_argument("--smoke", action="store_true", help="run the models once after export (default with --random-weights)")
    ap.add_argument("--check-only", action="store_true", help="only check an existing --out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.random_weights and not args.check_only:
        need = {"unet": "unet_ckpt", "whisper_encoder": "whisper_ckpt", "vae_encoder": "vae_weights",
                "vae_decoder": "vae_weights", "unet_deepcache_full": "unet_ckpt",
                "unet_deepcache_shallow": "unet_ckpt"}  # ddim_step: no weights
        missing = sorted({need[r] for r in (args.only or FILES) if r in need and not getattr(args, need[r])})
        if missing:
            ap.error("without --random-weights, give " + ", ".join("--" + m.replace("_", "-") for m in missing))
    out = args.out or MODELS / "generated" / args.profile
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke or args.random_weights
    if args.check_only:
        fails = check(out, args.profile, args.precision, None, smoke, args.threads)
        log("check: " + ("OK" if not fails else f"{len(fails)} FAILED"))
        return 1 if fails else 0

    manifest = gen_tiny._load_manifest()["profiles"][args.profile]
    if args.only and set(args.only) == {"ddim_step"}:
        # no weights, no torch: add the DDIM step graph to an existing export
        write_ddim_step(out, args.profile, args.precision, args.random_weights)
        if not all((out / f).exists() for f in FILES.values()):
            log("--only: not all models present, no lock file / check")
            return 0
        write_lock(out, args.profile, args.precision, args)
        fails = check(out, args.profile, args.precision, None, smoke, args.threads)
        log("check: " + ("OK" if not fails else f"{len(fails)} FAILED: " + "; ".join(fails)))
        return 1 if fails else 0

    import onnx
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    src = args.latentsync_src.resolve()
    log(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"LatentSync {src}")
    t_all = time.time()
    whisper_model, unet_mod = import_latentsync(src)
    t0 = time.time()
    mods = build_modules(args, whisper_model, unet_mod)
    log(f"modules built in {time.time() - t0:.1f} s ({'random weights, seed %d' % args.seed if args.random_weights else 'checkpoints loaded strictly'})")
    props = {"lipsync.profile": args.profile, "lipsync.precision": args.precision,
             "lipsync.random_weights": str(bool(args.random_weights)).lower()}
    timings = {}
    for role in args.only or FILES:
        if role == "ddim_step":
            write_ddim_step(out, args.profile, args.precision, args.random_weights)
            continue
        timings[role] = export_one(role, mods[role], manifest["models"][role], out, args.precision, props)
    log("mask: " + write_mask(out, manifest["mask"]["size"], src))
    if args.only and not all((out / f).exists() for f in FILES.values()):
        log("--only: not all four models present, no lock file / check")
        return 0
    write_lock(out, args.profile, args.precision, args)
    log(f"export total {time.time() - t_all:.1f} s; lock file {out / LOCK_FILE}")
    fails = check(out, args.profile, args.precision, mods, smoke, args.threads)
    log("check: " + ("OK" if not fails else f"{len(fails)} FAILED: " + "; ".join(fails)))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
