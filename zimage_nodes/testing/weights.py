"""Random-weight Z-Image-Turbo checkpoints in exactly the layouts users have (tiny or full size).

The key names and shapes come from explicit spec functions (``dit_tensors``, ``te_tensors``,
``vae_tensors``) that follow the ComfyUI repackaged files and the Tongyi-MAI/Z-Image-Turbo diffusers repo;
tests/unit/test_weights.py checks them against ComfyUI's, transformers' and diffusers' own modules. Every tensor is drawn from its own generator
seeded by (seed, component, key), so values do not depend on the layout or the order of writing, and
each file is written header first, then tensor by tensor: a full-size DiT never sits in memory.

    python -m zimage_nodes.testing.weights --models-dir DIR --scale tiny|full [--only dit,te,vae] [--no-diffusers]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch
from torch import Tensor

from ..core.st_io import TORCH_TO_ST

REPO = Path(__file__).resolve().parents[2]
DIFFUSERS_VERSION = "0.36.0.dev0"  # as in the real repo's configs
N_SHARDS = 3  # the real repo's transformer/ and text_encoder/ both have 3 shards


# ---------------------------------------------------------------- configurations

@dataclass(frozen=True)
class DiTSpec:
    """Z-Image DiT sizes (names as in core.dit.DiTConfig)."""
    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    ffn_hidden: int
    cap_feat_dim: int
    t_hidden: int
    adaln_dim: int
    in_channels: int = 16
    patch_size: int = 2
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim // self.n_heads != sum(self.axes_dims):
            raise ValueError(f"head_dim {self.dim // self.n_heads} must equal sum(axes_dims) {sum(self.axes_dims)}")


@dataclass(frozen=True)
class TESpec:
    """Qwen3 text encoder sizes."""
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 151936
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    max_positions: int = 40960


@dataclass(frozen=True)
class VAESpec:
    """Flux VAE sizes (diffusers AutoencoderKL names)."""
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    latent_channels: int = 16
    in_channels: int = 3
    norm_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass(frozen=True)
class Scale:
    name: str
    dit: DiTSpec
    te: TESpec
    vae: VAESpec


# ComfyUI's NextDiT sizes: t_embedder hidden min(dim, 1024), FFN 256 * ceil(int(8/3 * dim) / 256).
TINY = Scale("tiny",
             DiTSpec(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, ffn_hidden=768, cap_feat_dim=64,
                     t_hidden=256, adaln_dim=256),
             TESpec(hidden=64, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=32, intermediate=128),
             VAESpec(block_out_channels=(32, 32, 64, 64)))
FULL = Scale("full",
             DiTSpec(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, ffn_hidden=10240, cap_feat_dim=2560,
                     t_hidden=1024, adaln_dim=256),
             TESpec(hidden=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, intermediate=9728),
             VAESpec(block_out_channels=(128, 256, 512, 512)))
SCALES = {"tiny": TINY, "full": FULL}


def diffusers_compatible(spec: DiTSpec) -> DiTSpec:
    """The DiT diffusers' ZImageTransformer2DModel builds for ``spec.dim``: it fixes t_embedder's hidden size
    at 1024 and the FFN at int(dim / 3 * 8). Equal to ``spec`` at full size; TINY (ComfyUI's sizes) differs."""
    return replace(spec, t_hidden=1024, ffn_hidden=int(spec.dim / 3 * 8))


# ---------------------------------------------------------------- key lists

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint and the normal distribution its random values are drawn from."""
    name: str
    shape: tuple[int, ...]
    mean: float = 0.0
    std: float = 1.0


_NORM_STD = 0.02  # norm weights ~ N(1, 0.02); biases ~ N(0, 0.02)


def _linear(name: str, out_f: int, in_f: int, bias: bool) -> list[TensorSpec]:
    specs = [TensorSpec(f"{name}.weight", (out_f, in_f), std=in_f ** -0.5)]
    return specs + [TensorSpec(f"{name}.bias", (out_f,), std=_NORM_STD)] if bias else specs


def _conv(name: str, out_c: int, in_c: int, k: int) -> list[TensorSpec]:
    return [TensorSpec(f"{name}.weight", (out_c, in_c, k, k), std=(in_c * k * k) ** -0.5),
            TensorSpec(f"{name}.bias", (out_c,), std=_NORM_STD)]


def _norm(name: str, n: int, bias: bool = False) -> list[TensorSpec]:
    specs = [TensorSpec(f"{name}.weight", (n,), mean=1.0, std=_NORM_STD)]
    return specs + [TensorSpec(f"{name}.bias", (n,), std=_NORM_STD)] if bias else specs


def _dit_block(p: str, s: DiTSpec, modulated: bool) -> list[TensorSpec]:
    hd = s.dim // s.n_heads
    out = (_linear(f"{p}.attention.qkv", 3 * s.dim, s.dim, False) + _linear(f"{p}.attention.out", s.dim, s.dim, False)
           + _norm(f"{p}.attention.q_norm", hd) + _norm(f"{p}.attention.k_norm", hd)
           + _linear(f"{p}.feed_forward.w1", s.ffn_hidden, s.dim, False)
           + _linear(f"{p}.feed_forward.w2", s.dim, s.ffn_hidden, False)
           + _linear(f"{p}.feed_forward.w3", s.ffn_hidden, s.dim, False)
           + _norm(f"{p}.attention_norm1", s.dim) + _norm(f"{p}.ffn_norm1", s.dim)
           + _norm(f"{p}.attention_norm2", s.dim) + _norm(f"{p}.ffn_norm2", s.dim))
    return out + _linear(f"{p}.adaLN_modulation.0", 4 * s.dim, s.adaln_dim, True) if modulated else out


def dit_tensors(s: DiTSpec) -> list[TensorSpec]:
    """The Z-Image DiT in the original key layout (z_image_turbo_bf16.safetensors; 454 tensors at full size)."""
    patch = s.patch_size * s.patch_size * s.in_channels
    out = _linear("x_embedder", s.dim, patch, True)
    for i in range(s.n_refiner_layers):
        out += _dit_block(f"noise_refiner.{i}", s, True)
    for i in range(s.n_refiner_layers):
        out += _dit_block(f"context_refiner.{i}", s, False)
    out += _linear("t_embedder.mlp.0", s.t_hidden, 256, True) + _linear("t_embedder.mlp.2", s.adaln_dim, s.t_hidden, True)
    out += _norm("cap_embedder.0", s.cap_feat_dim) + _linear("cap_embedder.1", s.dim, s.cap_feat_dim, True)
    for i in range(s.n_layers):
        out += _dit_block(f"layers.{i}", s, True)
    out += _norm("norm_final", s.dim)
    out += _linear("final_layer.linear", patch, s.dim, True)
    out += _linear("final_layer.adaLN_modulation.1", s.dim, s.adaln_dim, True)
    return out + [TensorSpec("x_pad_token", (1, s.dim)), TensorSpec("cap_pad_token", (1, s.dim))]


def te_tensors(s: TESpec) -> list[TensorSpec]:
    """Qwen3 in Hugging Face names with the ``model.`` prefix (qwen_3_4b.safetensors; 398 tensors at full size)."""
    out = [TensorSpec("model.embed_tokens.weight", (s.vocab, s.hidden))]
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    for i in range(s.n_layers):
        p = f"model.layers.{i}"
        out += (_linear(f"{p}.self_attn.q_proj", q, s.hidden, False) + _linear(f"{p}.self_attn.k_proj", kv, s.hidden, False)
                + _linear(f"{p}.self_attn.v_proj", kv, s.hidden, False)
                + _linear(f"{p}.self_attn.o_proj", s.hidden, q, False)
                + _norm(f"{p}.self_attn.q_norm", s.head_dim) + _norm(f"{p}.self_attn.k_norm", s.head_dim)
                + _linear(f"{p}.mlp.gate_proj", s.intermediate, s.hidden, False)
                + _linear(f"{p}.mlp.up_proj", s.intermediate, s.hidden, False)
                + _linear(f"{p}.mlp.down_proj", s.hidden, s.intermediate, False)
                + _norm(f"{p}.input_layernorm", s.hidden) + _norm(f"{p}.post_attention_layernorm", s.hidden))
    return out + _norm("model.norm", s.hidden)


def _resnet(p: str, c_in: int, c_out: int) -> list[TensorSpec]:
    out = _norm(f"{p}.norm1", c_in, True) + _conv(f"{p}.conv1", c_out, c_in, 3)
    out += _norm(f"{p}.norm2", c_out, True) + _conv(f"{p}.conv2", c_out, c_out, 3)
    return out + _conv(f"{p}.nin_shortcut", c_out, c_in, 1) if c_in != c_out else out


def _vae_mid(p: str, c: int) -> list[TensorSpec]:
    attn = _norm(f"{p}.attn_1.norm", c, True)
    for n in ("q", "k", "v", "proj_out"):
        attn += _conv(f"{p}.attn_1.{n}", c, c, 1)
    return _resnet(f"{p}.block_1", c, c) + attn + _resnet(f"{p}.block_2", c, c)


def vae_tensors(s: VAESpec) -> list[TensorSpec]:
    """The Flux VAE in the BFL layout (ae.safetensors; 244 tensors at full size)."""
    ch, levels = s.block_out_channels, len(s.block_out_channels)
    out = _conv("encoder.conv_in", ch[0], s.in_channels, 3)
    c = ch[0]
    for i in range(levels):
        for j in range(s.layers_per_block):
            out += _resnet(f"encoder.down.{i}.block.{j}", c, ch[i])
            c = ch[i]
        if i != levels - 1:
            out += _conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    out += _vae_mid("encoder.mid", c) + _norm("encoder.norm_out", c, True)
    out += _conv("encoder.conv_out", 2 * s.latent_channels, c, 3)
    c = ch[-1]
    out += _conv("decoder.conv_in", c, s.latent_channels, 3) + _vae_mid("decoder.mid", c)
    for i in reversed(range(levels)):
        for j in range(s.layers_per_block + 1):
            out += _resnet(f"decoder.up.{i}.block.{j}", c, ch[i])
            c = ch[i]
        if i != 0:
            out += _conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    return out + _norm("decoder.norm_out", c, True) + _conv("decoder.conv_out", s.in_channels, c, 3)


# ---------------------------------------------------------------- diffusers configs

def dit_diffusers_config(s: DiTSpec) -> dict:
    """transformer/config.json (ZImageTransformer2DModel)."""
    return {"_class_name": "ZImageTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "all_f_patch_size": [1], "all_patch_size": [s.patch_size], "axes_dims": list(s.axes_dims),
            "axes_lens": list(s.axes_lens), "cap_feat_dim": s.cap_feat_dim, "dim": s.dim,
            "in_channels": s.in_channels, "n_heads": s.n_heads, "n_kv_heads": s.n_heads, "n_layers": s.n_layers,
            "n_refiner_layers": s.n_refiner_layers, "norm_eps": s.norm_eps, "qk_norm": True,
            "rope_theta": s.rope_theta, "t_scale": s.t_scale}


def te_config(s: TESpec, dtype: torch.dtype) -> dict:
    """text_encoder/config.json as in the real repo (Qwen3ForCausalLM architecture, loaded as Qwen3Model)."""
    return {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": s.head_dim, "hidden_act": "silu",
            "hidden_size": s.hidden, "initializer_range": 0.02, "intermediate_size": s.intermediate,
            "max_position_embeddings": s.max_positions, "max_window_layers": s.n_layers, "model_type": "qwen3",
            "num_attention_heads": s.n_heads, "num_hidden_layers": s.n_layers, "num_key_value_heads": s.n_kv_heads,
            "rms_norm_eps": s.rms_eps, "rope_scaling": None, "rope_theta": s.rope_theta, "sliding_window": None,
            "tie_word_embeddings": True, "torch_dtype": str(dtype).removeprefix("torch."),
            "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": s.vocab}


def vae_diffusers_config(s: VAESpec) -> dict:
    """vae/config.json (AutoencoderKL, no quant convs)."""
    n = len(s.block_out_channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "block_out_channels": list(s.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * n,
            "force_upcast": True, "in_channels": s.in_channels, "latent_channels": s.latent_channels,
            "latents_mean": None, "latents_std": None, "layers_per_block": s.layers_per_block,
            "mid_block_add_attention": True, "norm_num_groups": s.norm_groups, "out_channels": s.in_channels,
            "sample_size": 1024, "scaling_factor": s.scaling_factor, "shift_factor": s.shift_factor,
            "up_block_types": ["UpDecoderBlock2D"] * n, "use_post_quant_conv": False, "use_quant_conv": False}


MODEL_INDEX = {"_class_name": "ZImagePipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
               "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                    "num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}


# ---------------------------------------------------------------- values and writers

def random_tensor(spec: TensorSpec, seed: int, component: str, dtype: torch.dtype) -> Tensor:
    """The tensor's values: deterministic for (seed, component, name), independent of everything else."""
    key = zlib.crc32(f"{component}:{spec.name}".encode())
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + key) % (2 ** 63))
    t = torch.randn(spec.shape, generator=g, dtype=torch.float32)
    return t.mul_(spec.std).add_(spec.mean).to(dtype)


Entry = tuple[str, torch.dtype, tuple[int, ...]]


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header (from entries announced up front) first,
    then each tensor's bytes, in the entries' order. A file left incomplete by an error is removed."""

    def __init__(self, path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.entries, self.nbytes, self._next = path, list(entries), offset, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: Tensor) -> None:
        want = self.entries[self._next] if self._next < len(self.entries) else None
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise ValueError(f"{self.path.name}: tensor {got} written where the header announced {want}")
        self._f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.entries):
            self.path.unlink()
            raise ValueError(f"{self.path.name}: {len(self.entries) - self._next} announced tensors never written")

    def abort(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)

    def close_sparse(self) -> None:
        """End the file with every tensor not yet written as zeros, without writing them (a sparse file)."""
        left = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.entries[self._next:])
        self._f.truncate(self._f.tell() + left)
        self._next = len(self.entries)
        self._f.close()

    @property
    def paths(self) -> list[Path]:
        return [self.path]


def write_sparse(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> Path:
    """A valid safetensors file with these keys and shapes whose data is all zeros, as a sparse file: for
    tests that need a file's layout (identification, foreign models in a slot), not its values."""
    writer = SafetensorsWriter(Path(path), [(k, dtype, tuple(s)) for k, s in shapes.items()])
    writer.close_sparse()
    return Path(path)


def shard_of(sizes: Sequence[int], n: int) -> list[int]:
    """Shard index of each tensor: contiguous groups, each filled up to an equal share of the bytes still
    to place, every shard non-empty."""
    n, total = min(n, len(sizes)), sum(sizes)
    out: list[int] = []
    shard = filled = done = 0
    budget = total / n if n else 0
    for i, size in enumerate(sizes):
        if out and shard < n - 1 and (filled >= budget or len(sizes) - i <= n - 1 - shard):
            shard, filled = shard + 1, 0
            budget = (total - done) / (n - shard)
        out.append(shard)
        filled += size
        done += size
    return out


class ShardedWriter:
    """The sharded files of a diffusers/transformers folder plus their ``*.safetensors.index.json``."""

    def __init__(self, folder: Path, stem: str, entries: Sequence[Entry], n_shards: int = N_SHARDS) -> None:
        shards = shard_of([math.prod(s) * d.itemsize for _, d, s in entries], n_shards)
        count = max(shards) + 1
        names = [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._writers = [SafetensorsWriter(folder / names[i], [e for e, s in zip(entries, shards) if s == i])
                         for i in range(count)]
        self._shard = {e[0]: self._writers[s] for e, s in zip(entries, shards)}
        self.index_path = folder / f"{stem}.safetensors.index.json"
        self._index = {"metadata": {"total_size": sum(w.nbytes for w in self._writers)},
                       "weight_map": dict(sorted((e[0], names[s]) for e, s in zip(entries, shards)))}

    def write(self, name: str, tensor: Tensor) -> None:
        self._shard[name].write(name, tensor)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self.index_path.write_text(json.dumps(self._index, indent=2) + "\n")

    def abort(self) -> None:
        for w in self._writers:
            w.abort()

    @property
    def paths(self) -> list[Path]:
        return [w.path for w in self._writers] + [self.index_path]


Convert = Callable[[str, Tensor], list[tuple[str, Tensor]]]
Writer = SafetensorsWriter | ShardedWriter


@dataclass
class _Output:
    """One file (or sharded set) fed from the generated tensors through a key/dtype conversion."""
    convert: Convert
    opener: Callable[[list[Entry]], Writer]


def _stream(specs: Iterable[TensorSpec], outputs: list[_Output], seed: int, component: str,
            dtype: torch.dtype) -> list[Path]:
    """Generate each tensor once and write it, converted, to every output; returns the files written.
    Headers come from running the same conversions on meta tensors."""
    specs = list(specs)
    writers: list[Writer] = []
    try:
        for out in outputs:
            entries = [(n, t.dtype, tuple(t.shape)) for s in specs
                       for n, t in out.convert(s.name, torch.empty(s.shape, dtype=dtype, device="meta"))]
            writers.append(out.opener(entries))
        for s in specs:
            t = random_tensor(s, seed, component, dtype)
            for out, w in zip(outputs, writers):
                for name, value in out.convert(s.name, t):
                    w.write(name, value)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.close()
    return [p for w in writers for p in w.paths]


def _same(name: str, t: Tensor) -> list[tuple[str, Tensor]]:
    return [(name, t)]


def _fp8(name: str, t: Tensor) -> list[tuple[str, Tensor]]:
    """The fp8 repack: 2-D matmul weights in float8_e4m3fn; norms, biases and pad tokens unchanged."""
    return [(name, t.to(torch.float8_e4m3fn) if t.ndim == 2 and name.endswith(".weight") else t)]


def _prefixed(name: str, t: Tensor) -> list[tuple[str, Tensor]]:
    return [("model.diffusion_model." + name, t)]


def _file(path: Path) -> Callable[[list[Entry]], Writer]:
    return lambda entries: SafetensorsWriter(path, entries)


def _shards(folder: Path, stem: str) -> Callable[[list[Entry]], Writer]:
    return lambda entries: ShardedWriter(folder, stem, entries)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- component writers

_S = TypeVar("_S", DiTSpec, TESpec, VAESpec)


def _spec(spec: _S | str, kind: type[_S], attr: str) -> _S:
    """A spec given as itself or as a scale name ("tiny"/"full")."""
    if isinstance(spec, kind):
        return spec
    if spec not in SCALES:
        raise ValueError(f"expected a {kind.__name__} or one of {sorted(SCALES)}, not {spec!r}")
    return getattr(SCALES[spec], attr)


def write_dit(path: Path | None, spec: DiTSpec | str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
              fp8_path: Path | None = None, prefixed_path: Path | None = None,
              diffusers_dir: Path | None = None) -> list[Path]:
    """Write the DiT in one pass to any of: the original single file (``path``), its fp8 repack, its
    ``model.diffusion_model.``-prefixed copy, and a diffusers ``transformer/`` folder (diffusers' own
    single-file converter applied tensor by tensor, stored in float32 like the real repo). Returns the files."""
    spec = _spec(spec, DiTSpec, "dit")
    outputs = [_Output(convert, _file(p)) for p, convert in ((path, _same), (fp8_path, _fp8),
                                                              (prefixed_path, _prefixed)) if p is not None]
    written: list[Path] = []
    if diffusers_dir is not None:
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers as conv

        def to_diffusers(name: str, t: Tensor) -> list[tuple[str, Tensor]]:
            return [(k, v.to(torch.float32)) for k, v in conv({name: t}).items()]
        outputs.append(_Output(to_diffusers, _shards(diffusers_dir, "diffusion_pytorch_model")))
        _write_json(diffusers_dir / "config.json", dit_diffusers_config(spec))
        written.append(diffusers_dir / "config.json")
    return _stream(dit_tensors(spec), outputs, seed, "dit", dtype) + written


def write_te(path: Path | None, spec: TESpec | str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
             diffusers_dir: Path | None = None) -> list[Path]:
    """Write the Qwen3 text encoder to ``path`` (single file) and/or a diffusers ``text_encoder/`` folder
    (the same keys, with the ``model.`` prefix, in shards). Returns the files."""
    spec = _spec(spec, TESpec, "te")
    outputs = [_Output(_same, _file(path))] if path is not None else []
    written: list[Path] = []
    if diffusers_dir is not None:
        outputs.append(_Output(_same, _shards(diffusers_dir, "model")))
        _write_json(diffusers_dir / "config.json", te_config(spec, dtype))
        written.append(diffusers_dir / "config.json")
    return _stream(te_tensors(spec), outputs, seed, "te", dtype) + written


def write_vae(path: Path | None, spec: VAESpec | str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
              diffusers_dir: Path | None = None) -> list[Path]:
    """Write the Flux VAE in the BFL layout to ``path`` and/or a diffusers ``vae/`` folder converted with
    diffusers' own LDM VAE converter. The VAE (84M parameters at full size) is held in memory. Returns the files."""
    spec = _spec(spec, VAESpec, "vae")
    specs = vae_tensors(spec)
    sd = {s.name: random_tensor(s, seed, "vae", dtype) for s in specs}
    written: list[Path] = []
    if path is not None:
        _write_dict(path, sd)
        written.append(path)
    if diffusers_dir is not None:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        config = vae_diffusers_config(spec)
        converted = convert_ldm_vae_checkpoint(sd, config)
        _write_json(diffusers_dir / "config.json", config)
        _write_dict(diffusers_dir / "diffusion_pytorch_model.safetensors", converted)
        written += [diffusers_dir / "config.json", diffusers_dir / "diffusion_pytorch_model.safetensors"]
    return written


def _write_dict(path: Path, sd: dict[str, Tensor]) -> None:
    w = SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()])
    try:
        for k, v in sd.items():
            w.write(k, v)
    except BaseException:
        w.abort()
        raise
    w.close()


def write_tokenizer(folder: Path, tokenizer_src: Path) -> list[Path]:
    """tokenizer/ as in the real repo: vocab.json, merges.txt, tokenizer_config.json copied from
    ``tokenizer_src`` and tokenizer.json made by transformers from them."""
    from transformers import AutoTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    names = ("vocab.json", "merges.txt", "tokenizer_config.json")
    for n in names:
        shutil.copyfile(tokenizer_src / n, folder / n)
    with tempfile.TemporaryDirectory() as tmp:
        AutoTokenizer.from_pretrained(str(tokenizer_src)).save_pretrained(tmp)
        shutil.copyfile(Path(tmp) / "tokenizer.json", folder / "tokenizer.json")
    return [folder / n for n in (*names, "tokenizer.json")]


# The single files users have: component -> (ComfyUI model folder, file name).
SINGLE_FILES = {"dit": ("diffusion_models", "z_image_turbo_bf16.safetensors"),
                "te": ("text_encoders", "qwen_3_4b.safetensors"), "vae": ("vae", "ae.safetensors")}
LAYOUTS = ("single", "fp8", "prefixed", "diffusers")
COMPONENTS = ("dit", "te", "vae")


def write_all(models_dir: Path, scale: str = "tiny", tokenizer_src: Path | None = None, seed: int = 0,
              dtype: torch.dtype = torch.bfloat16, layouts: Sequence[str] = LAYOUTS,
              only: Sequence[str] = COMPONENTS) -> dict[str, Path]:
    """Write the requested components and layouts under ComfyUI's model folder names and the real file
    names. Returns {"dit", "dit_fp8", "dit_prefixed", "te", "vae", "diffusers"} -> path (those written)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, not {scale!r}")
    unknown = (set(layouts) - set(LAYOUTS)) | (set(only) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown layouts/components {sorted(unknown)}")
    s = SCALES[scale]
    models_dir = Path(models_dir)
    folder = models_dir / "diffusers" / "Z-Image-Turbo"
    diffusers = "diffusers" in layouts
    if diffusers and tokenizer_src is None:
        raise ValueError("the diffusers layout needs tokenizer_src (ComfyUI's comfy/text_encoders/qwen25_tokenizer)")
    single = "single" in layouts
    out: dict[str, Path] = {}

    def keep(key: str, path: Path, wanted: bool) -> Path | None:
        if wanted:
            out[key] = path
        return path if wanted else None

    if "dit" in only:
        dm = models_dir / "diffusion_models"
        write_dit(keep("dit", dm / SINGLE_FILES["dit"][1], single), s.dit, seed=seed, dtype=dtype,
                  fp8_path=keep("dit_fp8", dm / "z_image_turbo_fp8_e4m3fn.safetensors", "fp8" in layouts),
                  prefixed_path=keep("dit_prefixed", dm / "z_image_turbo_prefixed.safetensors", "prefixed" in layouts),
                  diffusers_dir=folder / "transformer" if diffusers else None)
    if "te" in only:
        write_te(keep("te", models_dir.joinpath(*SINGLE_FILES["te"]), single), s.te, seed=seed,
                 dtype=dtype, diffusers_dir=folder / "text_encoder" if diffusers else None)
    if "vae" in only:
        write_vae(keep("vae", models_dir.joinpath(*SINGLE_FILES["vae"]), single), s.vae, seed=seed, dtype=dtype,
                  diffusers_dir=folder / "vae" if diffusers else None)
    if diffusers:
        _write_json(folder / "model_index.json", MODEL_INDEX)
        _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_tokenizer(folder / "tokenizer", Path(tokenizer_src))
        out["diffusers"] = folder
    return out


def single_files(models_dir: Path) -> dict[str, Path]:
    """Where the three single files are (or go) under a ComfyUI models folder."""
    return {k: Path(models_dir).joinpath(*v) for k, v in SINGLE_FILES.items()}


def ensure_single_files(models_dir: Path, scale: str = "full") -> dict[str, Path]:
    """The three single files, written (``scale``) unless all are there already: benchmarks reuse them."""
    paths = single_files(models_dir)
    if not all(p.is_file() for p in paths.values()):
        write_all(models_dir, scale=scale, layouts=("single",))
    return paths


# ---------------------------------------------------------------- command line

def _default_tokenizer_src() -> Path:
    root = Path(os.environ["COMFYUI_PATH"]) if "COMFYUI_PATH" in os.environ else REPO / ".comfyui" / "ComfyUI"
    return root / "comfy" / "text_encoders" / "qwen25_tokenizer"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m zimage_nodes.testing.weights", description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, required=True, help="ComfyUI models/ folder to write into")
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--only", default=",".join(COMPONENTS), help="comma-separated subset of dit,te,vae")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers/Z-Image-Turbo/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-src", type=Path, default=None,
                    help="Qwen tokenizer files (default: ComfyUI's comfy/text_encoders/qwen25_tokenizer)")
    args = ap.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    if set(only) - set(COMPONENTS):
        ap.error(f"--only takes a subset of {','.join(COMPONENTS)}")
    layouts = [lay for lay in LAYOUTS if not (args.no_diffusers and lay == "diffusers")]
    tok = args.tokenizer_src or _default_tokenizer_src()
    if "diffusers" in layouts and not (tok / "vocab.json").is_file():
        ap.error(f"no Qwen tokenizer files in {tok}: pass --tokenizer-src or --no-diffusers")
    written = write_all(args.models_dir, args.scale, tok, seed=args.seed, layouts=layouts, only=only)
    for key, path in written.items():
        print(f"{key:13s} {_size(path) / 1e6:12.1f} MB  {path}")


if __name__ == "__main__":
    main()
