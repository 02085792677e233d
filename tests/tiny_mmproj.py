"""A tiny randomly initialised llama.cpp vision projector (``mmproj``) GGUF, built here
so vision tests need no download.

It is a LLaVA-style "mlp" projector, the simplest one libmtmd knows: a CLIP ViT
(patch embedding, learned positions, pre-norm blocks) whose patch features go
through ``mm.0`` (linear), GELU, ``mm.2`` (linear) into the text model's embedding
width. Keys and tensor names follow llama.cpp's ``tools/mtmd/clip-impl.h`` and
``clip.cpp`` (``load_hparams``, ``load_tensors``, ``models/llava.cpp``) as of the
libmtmd in llama-cpp-python 0.3.36. The llava graph runs the blocks up to the
second-to-last, so ``block_count`` 2 runs one block (both must be in the file).

An image becomes ``(image_size / patch_size) ** 2`` embeddings: 16 with the defaults.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["write_tiny_mmproj"]


def write_tiny_mmproj(path: Path, *, text_embd: int, image_size: int = 32,
                      patch_size: int = 8, hidden: int = 32, ffn: int = 64,
                      heads: int = 2, blocks: int = 2, projector_hidden: int = 64,
                      seed: int = 0) -> Path:
    """Write the projector to ``path`` and return it. ``text_embd`` is the text
    model's embedding width (``n_embd``), which libmtmd checks against mm.2's rows."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                         f"{patch_size}")
    if hidden == ffn:
        # NOTE: clip.cpp swaps ffn_up/ffn_down of "legacy" files when ffn_down's
        # input width equals n_embd; distinct widths keep ours unambiguous.
        raise ValueError("hidden and ffn must differ")
    rng = np.random.default_rng(seed)
    n_pos = (image_size // patch_size) ** 2

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def ones(*shape: int) -> np.ndarray:
        return np.ones(shape, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), arch="clip")
    writer.add_name("llmux tiny random mmproj")
    writer.add_description("randomly initialised, for tests only")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch_size)
    writer.add_uint32("clip.vision.embedding_length", hidden)
    writer.add_uint32("clip.vision.feed_forward_length", ffn)
    writer.add_uint32("clip.vision.block_count", blocks)
    writer.add_uint32("clip.vision.projection_dim", text_embd)
    writer.add_uint32("clip.vision.attention.head_count", heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    # numpy shapes are (out, in): GGUF stores them reversed, as ggml's ne.
    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": weight(hidden, 3, patch_size, patch_size),
        "v.patch_embd.bias": zeros(hidden),
        "v.position_embd.weight": weight(n_pos, hidden),
        "v.pre_ln.weight": ones(hidden),
        "v.pre_ln.bias": zeros(hidden),
    }
    for block in range(blocks):
        prefix = f"v.blk.{block}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{prefix}.{name}.weight"] = weight(hidden, hidden)
            tensors[f"{prefix}.{name}.bias"] = zeros(hidden)
        for name in ("ln1", "ln2"):
            tensors[f"{prefix}.{name}.weight"] = ones(hidden)
            tensors[f"{prefix}.{name}.bias"] = zeros(hidden)
        tensors[f"{prefix}.ffn_up.weight"] = weight(ffn, hidden)
        tensors[f"{prefix}.ffn_up.bias"] = zeros(ffn)
        tensors[f"{prefix}.ffn_down.weight"] = weight(hidden, ffn)
        tensors[f"{prefix}.ffn_down.bias"] = zeros(hidden)
    tensors["mm.0.weight"] = weight(projector_hidden, hidden)
    tensors["mm.0.bias"] = zeros(projector_hidden)
    tensors["mm.2.weight"] = weight(text_embd, projector_hidden)
    tensors["mm.2.bias"] = zeros(text_embd)
    for name, data in tensors.items():
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
