"""Tiny GGUF models for the real llama.cpp engine: the llama architecture with random
weights, a byte-level vocabulary (259 tokens and a few words) and a chat template,
about 0.5 MB each. They load in a fraction of a second and answer nonsense, fast:
enough to route, stream, switch and stop a real engine."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["write_tiny_gguf"]

_WORDS = ("the", "a", "and", "hello", "world", "gpu", "mode")
_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                  "{% endfor %}assistant:")


def write_tiny_gguf(path: Path, seed: int, *, n_embd: int = 64, n_layer: int = 2,
                    n_head: int = 4, n_ff: int = 128, context: int = 256) -> Path:
    """Write a model to `path` (different seeds, different weights)."""
    rng = np.random.default_rng(seed)
    # SentencePiece-style: <unk>, <s>, </s>, a byte fallback for every byte, some words.
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [("\u2581" + word).encode() for word in _WORDS]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_WORDS)  # unknown, control, byte, normal
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"gpuwarden-tiny-{seed}")
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(_CHAT_TEMPLATE)

    def weights(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def ones(name: str) -> None:
        writer.add_tensor(name, np.ones(n_embd, dtype=np.float32))

    weights("token_embd.weight", len(tokens), n_embd)
    ones("output_norm.weight")
    weights("output.weight", len(tokens), n_embd)
    for i in range(n_layer):
        ones(f"blk.{i}.attn_norm.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            weights(f"blk.{i}.{part}.weight", n_embd, n_embd)
        ones(f"blk.{i}.ffn_norm.weight")
        weights(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        weights(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        weights(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
