"""Z-Image's text encoder: Qwen3 (transformers' ``Qwen3Model``) run up to ``hidden_states[-2]``.

The conditioning is the output of the second-to-last decoder layer, before the final norm, so
the last layer and ``model.norm`` are neither built nor loaded. Also here: the prompt template,
the Qwen2 BPE tokenizer, and a cache of prompt embeddings (in memory and optionally on disk).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from .errors import CheckpointError, InputError

PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 512

# Tensors of one Qwen3 decoder layer, relative to ``layers.N.`` (biases only with attention_bias).
_LAYER_TENSORS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_ATTENTION_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
_TEMPLATE_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
_FIX_TE = ("Load a Qwen3-4B text encoder, e.g. qwen_3_4b.safetensors from Comfy-Org/z_image_turbo "
           "(split_files/text_encoders), into models/text_encoders.")


def _layer_indices(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def qwen3_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "model.") -> Qwen3Config:
    """The Qwen3 config of a checkpoint (all its layers), inferred from tensor names and shapes.

    ``prefix`` is ``"model."`` for ComfyUI's single file and the diffusers ``text_encoder/``
    shards, ``""`` for a bare ``Qwen3Model`` state dict."""
    layers = _layer_indices(shapes, prefix)
    first = f"{prefix}layers.0."
    required = [f"{prefix}embed_tokens.weight"] + [first + t for t in _LAYER_TENSORS]
    missing = [k for k in required if k not in shapes]
    if missing or not layers:
        raise CheckpointError(
            "This file is not a Qwen3 text encoder.",
            found=f"{len(shapes)} tensors; missing {', '.join(missing[:4]) or 'every layers.N tensor'}"
                  + (" ..." if len(missing) > 4 else ""),
            expected=f"Qwen3 tensors named {prefix}embed_tokens.weight, {prefix}layers.N.self_attn.q_proj.weight, "
                     f"{prefix}layers.N.self_attn.q_norm.weight, ...",
            fix=_FIX_TE)
    if layers != list(range(len(layers))):
        raise CheckpointError(
            "The text encoder's layers are not numbered 0..N-1 (incomplete or damaged file).",
            found=f"layer indices {layers[:3]} ... {layers[-3:]}", expected="layers 0, 1, ..., N-1", fix=_FIX_TE)
    if len(layers) < 2:
        raise CheckpointError(
            "The text encoder has a single layer; Z-Image uses the output of the second-to-last layer.",
            found="1 layer", expected="at least 2 layers (Qwen3-4B has 36)", fix=_FIX_TE)
    vocab, hidden = shapes[f"{prefix}embed_tokens.weight"]
    head_dim = shapes[first + "self_attn.q_norm.weight"][0]
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes[first + "mlp.gate_proj.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=shapes[first + "self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes[first + "self_attn.k_proj.weight"][0] // head_dim,
        head_dim=head_dim,
        attention_bias=first + "self_attn.q_proj.bias" in shapes,
        rope_theta=1_000_000.0,  # transformers 5 stores it in rope_parameters
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
    )


def te_key_map(shapes: Mapping[str, tuple[int, ...]], prefix: str = "model.") -> dict[str, str]:
    """File key -> ``ZImageTextEncoder`` parameter name, for the tensors the encoder builds.

    Covers ``embed_tokens`` and every layer but the last; the last layer, ``norm`` and ``lm_head``
    are skipped. CheckpointError when a built layer lacks a tensor or holds one this encoder
    cannot use (e.g. the per-tensor scales of a "scaled fp8" file)."""
    config = qwen3_config_from_shapes(shapes, prefix)
    built = config.num_hidden_layers - 1
    names = list(_LAYER_TENSORS) + (list(_ATTENTION_BIASES) if config.attention_bias else [])
    mapping = {f"{prefix}embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(built):
        for name in names:
            mapping[f"{prefix}layers.{i}.{name}"] = f"model.layers.{i}.{name}"
    missing = [k for k in mapping if k not in shapes]
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    unknown = [k for k in shapes if (m := pattern.match(k)) and int(m.group(1)) < built and k not in mapping]
    if missing or unknown:
        raise CheckpointError(
            "The text encoder file has tensors this loader cannot use, or lacks some it needs.",
            found="; ".join(filter(None, [
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unknown[:3])}" if unknown else ""])),
            expected=f"a plain (bf16/fp16/fp32) Qwen3 checkpoint with {', '.join(names[:3])}, ... in every layer",
            fix="Use the bf16 qwen_3_4b.safetensors; quantized/scaled-fp8 repacks are not supported by this node.")
    return mapping


class ZImageTextEncoder(nn.Module):
    """Qwen3 with its last layer and final norm removed: ``forward`` returns ``hidden_states[-2]``.

    ``config`` describes the checkpoint (all its layers); one layer fewer is built. With
    ``device="meta"`` the parameters are placeholders to be replaced one by one (see
    ``te_key_map``); the rotary frequencies are always real fp32 tensors on the CPU and move to
    the input's device on use. Cast parameters through ``dtype`` here, not with ``.to(dtype)``
    afterwards, which would also round the rotary frequencies."""

    def __init__(self, config: Qwen3Config, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = config.num_hidden_layers - 1
        cfg.layer_types = list(config.layer_types[: cfg.num_hidden_layers])
        cfg._attn_implementation = "sdpa"
        with torch.device(device or "cpu"):
            model = Qwen3Model(cfg)
        if dtype is not None:
            model.to(dtype)
        model.norm = nn.Identity()
        model.rotary_emb = Qwen3RotaryEmbedding(cfg)
        self.model = model.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [1, L] (one unpadded prompt) -> ``[1, L, hidden]`` in the parameters' dtype."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"expected input_ids of shape [1, L>0], got {tuple(input_ids.shape)}")
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


def build_text_encoder(config: Qwen3Config, device: torch.device | str = "meta",
                       dtype: torch.dtype = torch.bfloat16) -> ZImageTextEncoder:
    """A ``ZImageTextEncoder`` for ``config`` (the file's), by default with meta placeholders."""
    return ZImageTextEncoder(config, device=device, dtype=dtype)


def load_tokenizer(folder: str | Path) -> Qwen2Tokenizer:
    """The Qwen2 BPE tokenizer from ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` +
    ``tokenizer_config.json`` (the last one declares the ``<|im_start|>``/``<|im_end|>`` tokens)."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    has_json = "tokenizer.json" in names
    has_bpe = {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    fix = ("Point the node at a folder with those files. ComfyUI ships them in "
           "comfy/text_encoders/qwen25_tokenizer; a diffusers Z-Image-Turbo folder has them in tokenizer/.")
    if not (has_json or has_bpe):
        raise CheckpointError(
            f"Missing tokenizer files in {folder}.",
            found=", ".join(sorted(names)) if names else ("an empty folder" if folder.is_dir() else "no such folder"),
            expected="tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json (Qwen2 BPE)", fix=fix)
    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # damaged files raise assorted types (KeyError, JSONDecodeError, tokenizers' own)
        raise CheckpointError(f"Could not read the tokenizer in {folder}.", found=f"{type(e).__name__}: {e}",
                              expected="the Qwen2 BPE tokenizer files", fix=fix) from e
    for token in _TEMPLATE_SPECIAL_TOKENS:
        if len(tokenizer.encode(token, add_special_tokens=False)) != 1:
            raise CheckpointError(
                f"The tokenizer in {folder} does not know the chat token {token}.",
                found=f"{token} split into several tokens",
                expected="a Qwen tokenizer whose tokenizer.json or tokenizer_config.json declares <|im_start|> and "
                         "<|im_end|>", fix=fix)
    return tokenizer


def tokenize(tokenizer: Qwen2Tokenizer, prompt: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], bool]:
    """Token ids of ``PROMPT_TEMPLATE.format(prompt)`` and whether they were cut to ``max_tokens``.

    The template is applied by hand (no system line), the tokenizer adds no special tokens."""
    if max_tokens < 1:
        raise InputError("max_tokens must be at least 1.", found=str(max_tokens), expected=f"1..{MAX_TOKENS}",
                         fix=f"Use the default of {MAX_TOKENS}.")
    ids = tokenizer.encode(PROMPT_TEMPLATE.format(prompt), add_special_tokens=False)
    return ids[:max_tokens], len(ids) > max_tokens


class EmbeddingCache:
    """Prompt embeddings keyed by (prompt text, text-encoder identity).

    An LRU of ``max_entries`` CPU tensors, and with ``directory`` also one safetensors file per
    entry named by the key's sha256 (no pickle). The identity string must change whenever the
    weights or the dtype of the encoder change (e.g. file path, size, mtime and dtype)."""

    def __init__(self, max_entries: int = 32, directory: str | Path | None = None) -> None:
        self.max_entries = max_entries
        self.directory = Path(directory) if directory is not None else None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._hits = 0
        self._misses = 0

    @property
    def stats(self) -> dict[str, int]:
        """``{"hits": ..., "misses": ..., "entries": ...}`` (entries held in memory)."""
        return {"hits": self._hits, "misses": self._misses, "entries": len(self._memory)}

    @staticmethod
    def _digest(prompt: str, identity: str) -> str:
        return hashlib.sha256(json.dumps([prompt, identity]).encode("utf-8")).hexdigest()

    def _remember(self, digest: str, embedding: torch.Tensor) -> None:
        self._memory[digest] = embedding
        self._memory.move_to_end(digest)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def _read_disk(self, digest: str, prompt: str, identity: str) -> torch.Tensor | None:
        path = self.directory / f"{digest}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("prompt") != prompt or meta.get("identity") != identity:
                    return None
                return f.get_tensor("embedding")
        except (SafetensorError, OSError, KeyError):  # damaged entry: treat as absent
            return None

    def get(self, prompt: str, identity: str) -> torch.Tensor | None:
        """A copy of the cached embedding (CPU), or None."""
        digest = self._digest(prompt, identity)
        embedding = self._memory.get(digest)
        if embedding is None and self.directory is not None:
            embedding = self._read_disk(digest, prompt, identity)
        if embedding is None:
            self._misses += 1
            return None
        self._hits += 1
        self._remember(digest, embedding)
        return embedding.clone()

    def put(self, prompt: str, identity: str, embedding: torch.Tensor) -> None:
        """Store a copy of ``embedding`` on the CPU (and on disk when a directory is set)."""
        digest = self._digest(prompt, identity)
        stored = embedding.detach().to("cpu", copy=True).contiguous()
        self._remember(digest, stored)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{digest}.safetensors"
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file({"embedding": stored}, str(tmp), metadata={"prompt": prompt, "identity": identity})
            os.replace(tmp, path)
