"""A synthetic Stable Diffusion model for sd-server's smoke test and the tests: the real tensor names and shapes
of its smallest supported layout with the full VAE (SD1 tiny UNet, CLIP ViT-L/14's text encoder, the SD1 VAE),
every weight zero. No image model can be had without the hub; sd.cpp checks every tensor's name and shape, so the
layout must be exact, while the values may be anything: zero weights give a uniform image. Written as a GGUF
file whose data is a hole (sparse): about 1 GB on paper, a few KiB on disk.

The layout mirrors stable-diffusion.cpp's own constructors (src/unet.hpp, clip.hpp, auto_encoder_kl.hpp and
common_block.hpp at the commit pinned in containers/sources.lock); shapes here are PyTorch's (out, in, kh, kw)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

Shapes = dict[str, tuple[int, ...]]
F32, F16 = 0, 1
ALIGN = 32


# -- building blocks ----------------------------------------------------------------------------------------
def conv(t: Shapes, name: str, cin: int, cout: int, k: int = 3) -> None:
    t[f"{name}.weight"], t[f"{name}.bias"] = (cout, cin, k, k), (cout,)


def linear(t: Shapes, name: str, cin: int, cout: int, bias: bool = True) -> None:
    t[f"{name}.weight"] = (cout, cin)
    if bias:
        t[f"{name}.bias"] = (cout,)


def norm(t: Shapes, name: str, ch: int) -> None:
    t[f"{name}.weight"], t[f"{name}.bias"] = (ch,), (ch,)


# -- the UNet (unet.hpp UnetModelBlock, for VERSION_SD1_TINY_UNET) ------------------------------------------
def resblock(t: Shapes, name: str, cin: int, emb: int, cout: int) -> None:
    norm(t, f"{name}.in_layers.0", cin)
    conv(t, f"{name}.in_layers.2", cin, cout)
    linear(t, f"{name}.emb_layers.1", emb, cout)
    norm(t, f"{name}.out_layers.0", cout)
    conv(t, f"{name}.out_layers.3", cout, cout)
    if cin != cout:
        conv(t, f"{name}.skip_connection", cin, cout, 1)


def transformer(t: Shapes, name: str, ch: int, context: int) -> None:
    norm(t, f"{name}.norm", ch)
    conv(t, f"{name}.proj_in", ch, ch, 1)
    b = f"{name}.transformer_blocks.0"
    for attn, kv in (("attn1", ch), ("attn2", context)):
        linear(t, f"{b}.{attn}.to_q", ch, ch, bias=False)
        linear(t, f"{b}.{attn}.to_k", kv, ch, bias=False)
        linear(t, f"{b}.{attn}.to_v", kv, ch, bias=False)
        linear(t, f"{b}.{attn}.to_out.0", ch, ch)
    linear(t, f"{b}.ff.net.0.proj", ch, ch * 4 * 2)  # GEGLU
    linear(t, f"{b}.ff.net.2", ch * 4, ch)
    for n in ("norm1", "norm2", "norm3"):
        norm(t, f"{b}.{n}", ch)
    conv(t, f"{name}.proj_out", ch, ch, 1)


def unet(t: Shapes, p: str = "model.diffusion_model", model: int = 320, context: int = 768) -> None:
    """Tiny UNet: one res block per level, levels ×1 ×2 ×4, attention at each, no middle block. (SDXS-512-DS,
    the same without attention at full size, is smaller but needs a tiny autoencoder besides.)"""
    emb, mults, attention = model * 4, (1, 2, 4), (4, 2, 1)
    linear(t, f"{p}.time_embed.0", model, emb)
    linear(t, f"{p}.time_embed.2", emb, emb)
    conv(t, f"{p}.input_blocks.0.0", 4, model)
    chans, ch, idx, ds = [model], model, 0, 1
    for i, mult in enumerate(mults):
        idx += 1
        resblock(t, f"{p}.input_blocks.{idx}.0", ch, emb, mult * model)
        ch = mult * model
        if ds in attention:
            transformer(t, f"{p}.input_blocks.{idx}.1", ch, context)
        chans.append(ch)
        idx += 1  # (the tiny UNet skips the second res block's index)
        if i != len(mults) - 1:
            idx += 1
            conv(t, f"{p}.input_blocks.{idx}.0.op", ch, ch)
            chans.append(ch)
            ds *= 2
    out = 0
    for i in reversed(range(len(mults))):
        for j in range(2):
            ich = chans.pop()
            resblock(t, f"{p}.output_blocks.{out}.0", ch + ich, emb, mults[i] * model)
            ch, up = mults[i] * model, 1
            if ds in attention:
                transformer(t, f"{p}.output_blocks.{out}.1", ch, context)
                up += 1
            if i > 0 and j == 1:
                out += 1
                conv(t, f"{p}.output_blocks.{out}.{1 if out == 2 else up}.conv", ch, ch)
                ds //= 2
            out += 1
    norm(t, f"{p}.out.0", ch)
    conv(t, f"{p}.out.2", model, 4)


# -- CLIP ViT-L/14's text encoder (clip.hpp CLIPTextModel) --------------------------------------------------
def clip_text(t: Shapes, p: str = "cond_stage_model.transformer.text_model", d: int = 768, layers: int = 12,
              vocab: int = 49408, positions: int = 77) -> None:
    t[f"{p}.embeddings.token_embedding.weight"] = (vocab, d)
    t[f"{p}.embeddings.position_embedding.weight"] = (positions, d)
    for n in range(layers):
        layer = f"{p}.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(t, f"{layer}.self_attn.{proj}", d, d)
        norm(t, f"{layer}.layer_norm1", d)
        norm(t, f"{layer}.layer_norm2", d)
        linear(t, f"{layer}.mlp.fc1", d, d * 4)
        linear(t, f"{layer}.mlp.fc2", d * 4, d)
    norm(t, f"{p}.final_layer_norm", d)


# -- the SD1 VAE (auto_encoder_kl.hpp: encoder, decoder, quant convs) ---------------------------------------
def vae_resnet(t: Shapes, name: str, cin: int, cout: int) -> None:
    norm(t, f"{name}.norm1", cin)
    conv(t, f"{name}.conv1", cin, cout)
    norm(t, f"{name}.norm2", cout)
    conv(t, f"{name}.conv2", cout, cout)
    if cin != cout:
        conv(t, f"{name}.nin_shortcut", cin, cout, 1)


def vae_middle(t: Shapes, p: str, ch: int) -> None:
    vae_resnet(t, f"{p}.mid.block_1", ch, ch)
    norm(t, f"{p}.mid.attn_1.norm", ch)
    for n in ("q", "k", "v", "proj_out"):
        conv(t, f"{p}.mid.attn_1.{n}", ch, ch, 1)
    vae_resnet(t, f"{p}.mid.block_2", ch, ch)


def vae(t: Shapes, p: str = "first_stage_model", ch: int = 128, mults: tuple[int, ...] = (1, 2, 4, 4),
        z: int = 4) -> None:
    e = f"{p}.encoder"
    conv(t, f"{e}.conv_in", 3, ch)
    block_in = ch
    for i, mult in enumerate(mults):
        block_in = ch * (mults[i - 1] if i else 1)
        for j in range(2):
            vae_resnet(t, f"{e}.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
        if i != len(mults) - 1:
            conv(t, f"{e}.down.{i}.downsample.conv", block_in, block_in)
    vae_middle(t, e, block_in)
    norm(t, f"{e}.norm_out", block_in)
    conv(t, f"{e}.conv_out", block_in, 2 * z)
    d = f"{p}.decoder"
    block_in = ch * mults[-1]
    conv(t, f"{d}.conv_in", z, block_in)
    vae_middle(t, d, block_in)
    for i in reversed(range(len(mults))):
        for j in range(3):
            vae_resnet(t, f"{d}.up.{i}.block.{j}", block_in, ch * mults[i])
            block_in = ch * mults[i]
        if i != 0:
            conv(t, f"{d}.up.{i}.upsample.conv", block_in, block_in)
    norm(t, f"{d}.norm_out", block_in)
    conv(t, f"{d}.conv_out", block_in, 3)
    conv(t, f"{p}.quant_conv", 2 * z, 2 * z, 1)
    conv(t, f"{p}.post_quant_conv", z, z, 1)


def layout() -> Shapes:
    t: Shapes = {}
    unet(t)
    clip_text(t)
    vae(t)
    return t


# -- the file -----------------------------------------------------------------------------------------------
def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write(dest: Path, tensors: Shapes | None = None) -> Path:
    """A GGUF (v3) file of TENSORS, all zero: 1-D ones f32, the others f16; the data region is left a hole."""
    tensors = tensors if tensors is not None else layout()
    kv = [("general.architecture", "sd1"), ("general.name", "podllama synthetic SD1 tiny UNet (zero weights)")]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, value in kv:
        head += _string(key) + struct.pack("<I", 8) + _string(value)  # 8: string
    offset = 0
    for name, shape in tensors.items():
        kind = F32 if len(shape) == 1 else F16
        head += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        head += struct.pack("<IQ", kind, offset)
        size = (4 if kind == F32 else 2)
        for n in shape:
            size *= n
        offset += -(-size // ALIGN) * ALIGN
    head += b"\0" * (-len(head) % ALIGN)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with part.open("wb") as f:
        f.write(head)
        f.truncate(len(head) + offset)
    part.replace(dest)
    return dest


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, None for anything else."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
