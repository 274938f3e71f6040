"""The synthetic image model: a GGUF that the gguf reader parses, of the layout sd.cpp recognises as an SD1 tiny
UNet (its version detection in model.cpp), costing no disk."""

from __future__ import annotations

import gguf

from podllama.models import sdmodel


def test_the_zero_model_is_a_sparse_gguf_of_the_sd1_tiny_unet_layout(tmp_path):
    path = sdmodel.write(tmp_path / "m.gguf")
    st = path.stat()
    assert st.st_size > 10**9 and st.st_blocks * 512 < 10**6, "a GiB on paper, a hole on disk"
    tensors = {t.name: tuple(int(n) for n in t.shape) for t in gguf.GGUFReader(path).tensors}
    assert len(tensors) == len(sdmodel.layout())
    # what sd.cpp's get_sd_version looks at: CLIP-L's width, a UNet, no middle block, an attention at output 7
    assert tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (768, 49408)
    assert tensors["model.diffusion_model.input_blocks.0.0.weight"] == (3, 3, 4, 320)  # ggml order: kw, kh, in, out
    assert not any(n.startswith("model.diffusion_model.middle_block.") for n in tensors)
    assert "model.diffusion_model.output_blocks.7.1.transformer_blocks.0.attn1.to_k.weight" in tensors
    # the tiny UNet's skipped indexes and its up-samplers where sd.cpp names them
    assert {"model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.1.conv.weight",
            "model.diffusion_model.output_blocks.5.2.conv.weight"} <= set(tensors)
    assert not any(n.startswith(("model.diffusion_model.input_blocks.2.", "model.diffusion_model.input_blocks.8."))
                   for n in tensors)
    assert tensors["first_stage_model.decoder.conv_out.weight"] == (3, 3, 128, 3)


def test_png_size_reads_the_header_and_refuses_anything_else():
    head = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\x0dIHDR" + (64).to_bytes(4, "big") + (32).to_bytes(4, "big")
    assert sdmodel.png_size(head) == (64, 32)
    assert sdmodel.png_size(b"GIF89a" + head) is None and sdmodel.png_size(head[:20]) is None
