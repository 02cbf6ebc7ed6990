"""Staged loading of Z-Image's three components.

Stage 1 reads every header and identifies every file before anything is allocated; stage 2 builds
each module on the meta device from the configuration its shapes imply; stage 3 streams tensors from
the memory-mapped file straight to their device and dtype, one at a time; the text encoder is only
planned here and loaded when first needed (stage 5), without its last layer and final norm.
Handing the modules to ComfyUI's model management (stage 4) is the runtime's job.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from . import dit as dit_mod
from . import text_encoder as te_mod
from . import vae as vae_mod
from .errors import CheckpointError, InputError
from .identify import Kind, expect
from .ops import CastLinear, cast_linears, quantize_fp8, set_fp8_matmul, set_weight_scale
from .st_io import Header, TensorInfo, read_header, set_module_tensor, stream_tensors, torch_dtype

# Storage dtype choices offered per component ("auto" decides by device).
DTYPES: dict[str, Optional[torch.dtype]] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

ProgressFn = Callable[[int, int], None]  # (done, total) tensors of the current component


@dataclass
class Source:
    """One component's files (a single file, or the shards of a diffusers sub-folder)."""
    kind: Kind
    headers: list[Header]
    prefix: str
    layout: str  # "single" or "diffusers"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for h in self.headers:
            out.update(h.shapes())
        return out

    @property
    def nbytes(self) -> int:
        return sum(h.total_bytes() for h in self.headers)

    @property
    def identity(self) -> str:
        """Names the weights (paths, sizes and modification times): keys the embedding cache."""
        return ";".join(f"{h.path.resolve()}:{h.file_size}:{int(h.path.stat().st_mtime)}" for h in self.headers)

    def file_of(self) -> dict[str, Header]:
        return {k: h for h in self.headers for k in h.tensors}


@dataclass
class LoadPlan:
    dit: Source
    text_encoder: Source
    vae: Source
    tokenizer_dir: Path
    notes: list[str] = field(default_factory=list)
    own_tokenizer: bool = False  # the tokenizer files came with the diffusers folder (else ComfyUI's)

    def __post_init__(self) -> None:
        """The text encoder's width must be what the DiT's caption embedder takes."""
        cap = next((s[1] for k, s in self.dit.shapes.items()
                    if k.endswith(("cap_embedder.1.weight", "cap_embedder.0.weight")) and len(s) == 2), None)
        hidden = next((s[1] for k, s in self.text_encoder.shapes.items() if k.endswith("embed_tokens.weight")), None)
        if cap is not None and hidden is not None and cap != hidden:
            te = _label(self.text_encoder)
            if self.text_encoder.layout == "diffusers":
                fix = ("this diffusers folder mixes parts of different models: re-download its text_encoder/ "
                       "(Qwen3-4B for Z-Image-Turbo)")
            else:
                fix = "pick qwen_3_4b.safetensors (Qwen3-4B) in `text_encoder_name`"
            raise CheckpointError(
                f"The text encoder {te} does not fit the DiT {_label(self.dit)}.",
                found=f"text encoder width {hidden}, DiT caption width {cap}",
                expected=f"a text encoder of width {cap} (Z-Image-Turbo: Qwen3-4B, width 2560)", fix=fix)


def _label(source: Source) -> str:
    """A file name, or the folder of a diffusers sub-folder's shards."""
    return source.headers[0].path.name if source.layout == "single" else str(source.headers[0].path.parent)


# ---------------------------------------------------------------- stage 1: identify

def _single(path: Path, kind: Kind, slot: str) -> Source:
    header = read_header(path)
    ident = expect(header, kind, slot)
    return Source(kind, [header], ident.prefix, "single")


def _shard_files(folder: Path) -> list[Path]:
    """The weight files of a diffusers/transformers sub-folder: those its ``*.safetensors.index.json`` names
    (other files, e.g. fp16 variants, are ignored), else every ``*.safetensors`` file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return sorted(folder.glob("*.safetensors"))
    index = indexes[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index.", found=f"{type(e).__name__}: {e}",
                              expected='a JSON object with a "weight_map" of tensor name -> shard file',
                              fix=f"download {index.name} again (or the whole {folder.name}/ folder)") from e
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is incomplete: {len(missing)} of the {len(names)} shards its index lists are missing.",
            found=f"no {', '.join(missing)} (listed in {index.name})",
            expected=", ".join(names),
            fix=f"download the missing shard(s) into {folder} (an interrupted download leaves this state)")
    return [folder / n for n in names]


def _shards(folder: Path, kind: Kind, slot: str) -> Source:
    files = _shard_files(folder)
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise CheckpointError(
            f"No .safetensors weights in {folder}.",
            found=", ".join(pickles) if pickles else "no weight files",
            expected="diffusion_pytorch_model*.safetensors / model*.safetensors",
            fix="download the safetensors version of the folder (pickle .bin files are never loaded)")
    headers = [read_header(p) for p in files]
    owner: dict[str, Path] = {}
    for h in headers:
        for k in h.tensors:
            if k in owner:
                raise CheckpointError(
                    f"{folder} holds the same weights twice.",
                    found=f"tensor '{k}' in both {owner[k].name} and {h.path.name}",
                    expected="each tensor in one shard (as a *.safetensors.index.json lists them)",
                    fix="keep only one set of shards in the folder (e.g. remove the *.fp16.safetensors variant), "
                        "or add the folder's index.json")
            owner[k] = h.path
    merged = Header(path=folder, tensors={k: v for h in headers for k, v in h.tensors.items()},
                    metadata={}, file_size=sum(h.file_size for h in headers))
    ident = expect(merged, kind, slot)
    return Source(kind, headers, ident.prefix, "diffusers")


def plan_single_files(dit_path: Path, te_path: Path, vae_path: Path, tokenizer_dir: Path) -> LoadPlan:
    """Read the three headers and check each file is what its slot needs. Allocates nothing."""
    return LoadPlan(dit=_single(dit_path, Kind.ZIMAGE_DIT, "dit_name"),
                    text_encoder=_single(te_path, Kind.QWEN3_TE, "text_encoder_name"),
                    vae=_single(vae_path, Kind.FLUX_VAE, "vae_name"),
                    tokenizer_dir=tokenizer_dir)


def plan_diffusers_folder(folder: Path, fallback_tokenizer: Path) -> LoadPlan:
    """The Tongyi-MAI/Z-Image-Turbo folder layout (transformer/, text_encoder/, vae/, tokenizer/)."""
    index = folder / "model_index.json"
    try:
        json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index} is missing or not JSON.", found=str(e),
                              expected="a diffusers folder with model_index.json",
                              fix="copy the whole Z-Image-Turbo folder") from e
    for sub in ("transformer", "text_encoder", "vae"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"The diffusers folder {folder} has no '{sub}' sub-folder.",
                                  expected="transformer/, text_encoder/, vae/, tokenizer/",
                                  fix="copy the complete folder")
    tok = folder / "tokenizer"
    notes = []
    if not tok.is_dir():
        tok = fallback_tokenizer
        notes.append(f"{folder.name} has no tokenizer/; using ComfyUI's Qwen tokenizer files")
    return LoadPlan(dit=_shards(folder / "transformer", Kind.ZIMAGE_DIT, "diffusers_folder/transformer"),
                    text_encoder=_shards(folder / "text_encoder", Kind.QWEN3_TE, "diffusers_folder/text_encoder"),
                    vae=_shards(folder / "vae", Kind.FLUX_VAE, "diffusers_folder/vae"),
                    tokenizer_dir=tok, notes=notes, own_tokenizer=tok != fallback_tokenizer)


def load_tokenizer(plan: LoadPlan):
    """The plan's Qwen tokenizer; a CheckpointError whose fix fits where the files come from."""
    try:
        return te_mod.load_tokenizer(plan.tokenizer_dir)
    except CheckpointError as e:
        if plan.own_tokenizer:
            fix = (f"download the tokenizer/ folder of Tongyi-MAI/Z-Image-Turbo again (tokenizer.json, "
                   f"tokenizer_config.json, vocab.json, merges.txt), or delete the incomplete {plan.tokenizer_dir} "
                   "so that ComfyUI's own Qwen tokenizer files are used")
        else:
            fix = (f"ComfyUI's own Qwen tokenizer files are incomplete ({plan.tokenizer_dir}): update or "
                   "reinstall ComfyUI")
        raise CheckpointError(e.what, found=e.found, expected=e.expected, fix=fix) from e


# ---------------------------------------------------------------- dtype rules

def device_supports(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matmuls can run in this dtype on the device (fp8 is a storage format: the compute dtype is
    bf16/fp32; fp8 matmuls are a per-layer option of scaled fp8 weights, core/ops.py)."""
    if dtype in FP8:
        return False
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    return True


def choose_dtypes(choice: str, device: torch.device, component: str, input_name: str,
                  notes: list[str]) -> tuple[torch.dtype, torch.dtype]:
    """(storage dtype, compute dtype) for a component from the user's choice."""
    if choice not in DTYPES:
        raise InputError(f"`{input_name}`: unknown dtype '{choice}'.", expected=", ".join(DTYPES),
                         fix="choose auto")
    want = DTYPES[choice]
    bf16_ok = device_supports(torch.bfloat16, device)
    default = torch.bfloat16 if (device.type == "cuda" and bf16_ok) else torch.float32
    if want is None:
        return default, default
    if component == "vae" and want == torch.float16:
        notes.append("VAE: fp16 gives NaN/black images with this VAE; using bf16 instead")
        want = torch.bfloat16 if bf16_ok else torch.float32
    if want in FP8:
        if component == "vae":
            notes.append("VAE: fp8 is not supported for the VAE; using bf16")
            return torch.bfloat16, torch.bfloat16
        compute = torch.bfloat16 if bf16_ok else torch.float32
        notes.append(f"{component}: weights stored as {choice}, computed in {str(compute).replace('torch.', '')}")
        return want, compute
    if not device_supports(want, device):
        notes.append(f"{component}: {choice} is not supported on {device}; using {default}")
        return default, default
    return want, want


# ---------------------------------------------------------------- stages 2 and 3: build and stream

# A file tensor's destination: (module tensor name, piece index, number of pieces). Pieces are equal
# slices along dim 0 (diffusers splits the fused qkv into to_q/to_k/to_v; we stream them back in).
Target = tuple[str, int, int]

# diffusers' single-file converter renames (convert_z_image_transformer_checkpoint_to_diffusers), inverted.
_DIFFUSERS_DIT_RENAMES = [("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
                          (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
                          (".attention.norm_q.", ".attention.q_norm.")]
_QKV = {".attention.to_q.weight": 0, ".attention.to_k.weight": 1, ".attention.to_v.weight": 2}


def dit_targets(keys: list[str], prefix: str, layout: str) -> dict[str, Target]:
    """Where each DiT file tensor goes in ZImageDiT (whose names are the original file keys)."""
    out: dict[str, Target] = {}
    for key in keys:
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name == "scaled_fp8" or name.endswith(("scale_weight", "scale_input")):
            continue
        if layout == "diffusers":
            piece = next(((name.replace(s, ".attention.qkv.weight"), i) for s, i in _QKV.items() if name.endswith(s)),
                         None)
            if piece is not None:
                out[key] = (piece[0], piece[1], 3)
                continue
            for a, b in _DIFFUSERS_DIT_RENAMES:
                name = name.replace(a, b)
        out[key] = (name, 0, 1)
    return out


def original_shapes(shapes: dict[str, tuple[int, ...]], targets: dict[str, Target]) -> dict[str, tuple[int, ...]]:
    """The shapes the tensors have in the original layout (fused qkv rows summed)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, (name, _i, n) in targets.items():
        shape = shapes[key]
        out[name] = (shape[0] * n, *shape[1:]) if n > 1 else shape
    return out


def _check_targets(module: torch.nn.Module, source: Source, targets: dict[str, Target]) -> None:
    """Every mapped file tensor has a place of the right shape in the module (checked before reading)."""
    have = {n: tuple(t.shape) for n, t in list(module.named_parameters(remove_duplicate=False))
            + list(module.named_buffers(remove_duplicate=False))}
    shapes = source.shapes
    unknown = sorted(k for k, (name, _i, _n) in targets.items() if name not in have)
    wrong = []
    for key, (name, _i, n) in targets.items():
        if name in have:
            shape = shapes[key]
            full = (shape[0] * n, *shape[1:]) if n > 1 else tuple(shape)
            if full != have[name]:
                wrong.append(f"'{key}' {tuple(shape)} where {have[name]} is needed")
    if unknown or wrong:
        raise CheckpointError(
            f"{_label(source)} has tensors that do not fit the model its other tensors describe.",
            found="; ".join(filter(None, [f"{len(unknown)} unknown tensor(s), e.g. {', '.join(unknown[:3])}"
                                          if unknown else "",
                                          f"{len(wrong)} of another shape, e.g. {', '.join(wrong[:3])}"
                                          if wrong else ""])) + f" ({source.headers[0].path})",
            expected=f"an unmodified {'Z-Image DiT' if source.kind == Kind.ZIMAGE_DIT else 'Qwen3 text encoder'} "
                     "checkpoint",
            fix="download the original file again; merged or modified checkpoints of another structure are "
                "not supported")


def _fp8_linear_weights(module: torch.nn.Module, targets: dict[str, Target], infos: dict[str, TensorInfo],
                        dtype_for: Callable[[str, TensorInfo], Optional[torch.dtype]]) -> dict[str, torch.dtype]:
    """Module tensor name -> fp8 dtype for the CastLinear weights that ``dtype_for`` puts in fp8: these are
    stored with a per-tensor scale (core/ops.py). Other fp8 tensors (none in our models) are a plain cast."""
    out: dict[str, torch.dtype] = {}
    for key, (name, _i, _n) in targets.items():
        want = dtype_for(key, infos[key])
        owner_name, _, attr = name.rpartition(".")
        if want in FP8 and attr == "weight" and isinstance(module.get_submodule(owner_name), CastLinear):
            out[name] = want
    return out


def _stream_into(module: torch.nn.Module, source: Source, targets: dict[str, Target], device: torch.device,
                 dtype_for: Callable[[str, TensorInfo], Optional[torch.dtype]],
                 progress: Optional[ProgressFn], scales: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Copy every mapped tensor from the files into the meta-built module, one tensor at a time.

    ``scales`` (file key -> scale) are a "scaled fp8" repack's: such weights are read in fp32 and multiplied
    by their scale on the device, then converted to the dtype ``dtype_for`` gives.

    fp8 storage of a CastLinear weight keeps a per-tensor scale (``weight_scale``, core/ops.py): a file
    tensor already in that fp8 dtype is kept as it is, with the file's scalar ``scale_weight`` or scale 1
    (no requantization); any other (bf16/fp32, a per-channel scaled or other fp8 format, split q/k/v pieces
    with scales) is read in its own dtype (fp32 when scaled and dequantized), assembled, and quantized on the
    device with scale amax / fp8 max (``ops.quantize_fp8``)."""
    _check_targets(module, source, targets)
    scales = scales or {}
    infos = {k: i for h in source.headers for k, i in h.tensors.items()}
    fp8w = _fp8_linear_weights(module, targets, infos, dtype_for)
    keys_of: dict[str, list[str]] = {}
    for key, (name, _i, _n) in targets.items():
        keys_of.setdefault(name, []).append(key)
    keep: set[str] = set()  # fp8 weights taken from the file unchanged
    for name, want in fp8w.items():
        keys = keys_of[name]
        scaled = [k for k in keys if k in scales]
        if all(torch_dtype(infos[k]) == want for k in keys) and (
                not scaled or (len(keys) == 1 and scales[keys[0]].numel() == 1)):
            keep.add(name)

    def read_dtype(key: str, info: TensorInfo) -> Optional[torch.dtype]:
        name = targets[key][0]
        if name in fp8w:
            return fp8w[name] if name in keep else (torch.float32 if key in scales else None)
        return torch.float32 if key in scales else dtype_for(key, info)

    def place(name: str, tensor: torch.Tensor, file_scale: Optional[torch.Tensor]) -> None:
        if name not in fp8w:
            set_module_tensor(module, name, tensor)
            return
        if name in keep:
            scale = file_scale if file_scale is not None else torch.ones((), device=tensor.device)
        else:
            tensor, scale = quantize_fp8(tensor, fp8w[name])
        set_module_tensor(module, name, tensor)
        set_weight_scale(module.get_submodule(name.rpartition(".")[0]), scale)

    by_file: dict[Path, list[str]] = {}
    owner = source.file_of()
    for key in targets:
        by_file.setdefault(owner[key].path, []).append(key)
    partial: dict[str, tuple[torch.Tensor, int]] = {}
    total, done = len(targets), 0
    for path, keys in by_file.items():
        for key, tensor in stream_tensors(path, keys, device, read_dtype):
            name, index, pieces = targets[key]
            if key in scales and name not in keep:
                tensor = tensor.mul_(scales[key].to(device))
                if name not in fp8w:
                    tensor = tensor.to(dtype_for(key, infos[key]) or torch_dtype(infos[key]))
            if pieces == 1:
                place(name, tensor, scales.get(key) if name in keep else None)
            else:
                buf, filled = partial.get(name, (None, 0))
                if buf is None:
                    buf = torch.empty((tensor.shape[0] * pieces, *tensor.shape[1:]), device=device, dtype=tensor.dtype)
                rows = tensor.shape[0]
                buf[index * rows:(index + 1) * rows].copy_(tensor)
                del tensor
                partial[name] = (buf, filled + 1)
                if filled + 1 == pieces:
                    place(name, partial.pop(name)[0], None)
            done += 1
            if progress is not None:
                progress(done, total)
    if partial:
        raise CheckpointError(f"{source.headers[0].path}: the split q/k/v projections are incomplete.",
                              found=f"pieces of {sorted(partial)[:3]}", expected="to_q, to_k and to_v for every block",
                              fix="re-download the transformer folder")


def _check_complete(module: torch.nn.Module, source: Source) -> None:
    left = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{source.headers[0].path} lacks weights the model needs.",
                              found=f"{len(left)} tensors missing, e.g. {left[:3]}",
                              expected="a complete Z-Image checkpoint", fix="re-download the file")


def _float_dtype_for(storage: torch.dtype, compute: torch.dtype
                     ) -> Callable[[str, TensorInfo], Optional[torch.dtype]]:
    """Matmul weights go to the storage dtype (fp8 allowed); with fp8 storage everything else (norms,
    biases, pad tokens, the token embedding table, which is indexed rather than multiplied) goes to the
    compute dtype."""
    def pick(name: str, info: TensorInfo) -> Optional[torch.dtype]:
        if storage in FP8:
            matmul = (len(info.shape) == 2 and name.endswith("weight") and min(info.shape) > 1
                      and "pad_token" not in name and "embed_tokens" not in name)
            return storage if matmul else compute
        return storage
    return pick


def resident_bytes(source: Source, storage: torch.dtype, compute: torch.dtype,
                   keys: Optional[Iterable[str]] = None) -> int:
    """Bytes the component will take on its device once loaded (the storage dtype, not the file's)."""
    pick = _float_dtype_for(storage, compute)
    infos = {k: i for h in source.headers for k, i in h.tensors.items()}
    total = 0
    for key in (infos if keys is None else keys):
        info = infos[key]
        dtype = pick(key, info) or torch_dtype(info)
        total += math.prod(info.shape) * dtype.itemsize
    return total


def _read_scales(source: Source, targets: dict[str, Target]) -> dict[str, torch.Tensor]:
    """The per-tensor scales of a "scaled fp8" repack (ComfyUI's: the weight stored as weight / scale in fp8,
    the scale beside it as ``<layer>.scale_weight``): weight key -> fp32 scale on the CPU. Small tensors,
    read before streaming. ``_stream_into`` keeps such a weight and its scale as they are for fp8 storage of
    the same fp8 dtype, and dequantizes it (weight * scale) for any other storage."""
    keys = [k for k in source.shapes if k.endswith(".scale_weight")
            and k[:-len("scale_weight")] + "weight" in targets]
    owner = source.file_of()
    out: dict[str, torch.Tensor] = {}
    for path in sorted({owner[k].path for k in keys}):
        names = [k for k in keys if owner[k].path == path]
        for key, scale in stream_tensors(path, names, "cpu", lambda _n, _i: torch.float32):
            out[key[:-len("scale_weight")] + "weight"] = scale
    return out


def load_dit(source: Source, device: torch.device, storage: torch.dtype, compute: torch.dtype,
             progress: Optional[ProgressFn] = None, fp8_matmul: bool = False) -> dit_mod.ZImageDiT:
    """The DiT streamed to ``device``. With fp8 ``storage`` every 2-D matmul weight is fp8 with a per-tensor
    scale (``_stream_into``); ``fp8_matmul`` (e4m3 storage) also turns on fp8 matmuls for the blocks'
    attention and feed-forward linears (``ops.set_fp8_matmul``; they run on CUDA only, else dequantized)."""
    shapes = source.shapes
    targets = dit_targets(list(shapes), source.prefix, source.layout)
    model = dit_mod.meta_dit_from_shapes(original_shapes(shapes, targets), dtype=compute)
    cfg = model.cfg
    _stream_into(model, source, targets, device, _float_dtype_for(storage, compute), progress,
                 scales=_read_scales(source, targets))
    if model.norm_final.weight.is_meta:  # unused by the forward; diffusers folders lack it
        set_module_tensor(model, "norm_final.weight", torch.ones(cfg.dim, device=device, dtype=compute))
    _check_complete(model, source)
    if fp8_matmul:
        set_fp8_matmul(model, True)
    return model.eval().requires_grad_(False)


def load_vae(source: Source, device: torch.device, dtype: torch.dtype,
             progress: Optional[ProgressFn] = None) -> vae_mod.ZImageVAE:
    return vae_mod.load_vae(source.headers, source.prefix, device=device, dtype=dtype, progress=progress)


@dataclass
class LazyTextEncoder:
    """The text encoder, planned at load time and built on first use (stage 5)."""
    source: Source
    device: torch.device
    storage: torch.dtype
    compute: torch.dtype
    module: Optional[te_mod.ZImageTextEncoder] = None

    def __post_init__(self) -> None:
        # taken now: the files may be moved later, while the loaded model stays in use. fp8 storage is named
        # "-scaled" (per-tensor scales): embeddings cached on disk from the earlier plain fp8 cast are not reused
        scaled = "-scaled" if self.storage in FP8 else ""
        self._identity = f"{self.source.identity};{_dtype_name(self.storage)}{scaled}/{_dtype_name(self.compute)}"

    @property
    def identity(self) -> str:
        """Keys the embedding cache: the files (path, size, mtime at load) and the dtypes of the embeddings."""
        return self._identity

    def _targets(self) -> dict[str, Target]:
        return {k: (v, 0, 1) for k, v in te_mod.te_key_map(self.source.shapes, self.source.prefix).items()}

    @property
    def n_tensors(self) -> int:
        """Tensors streamed by ``get`` (the last layer and the final norm are skipped)."""
        return len(self._targets())

    @property
    def nbytes(self) -> int:
        """Bytes the built encoder takes on its device."""
        return resident_bytes(self.source, self.storage, self.compute, self._targets())

    def get(self, progress: Optional[ProgressFn] = None,
            device: Optional[torch.device] = None) -> te_mod.ZImageTextEncoder:
        """Build and stream the encoder on first use (to ``device``, default its own; a memory policy
        that streams its blocks loads it to host memory)."""
        if self.module is None:
            config = te_mod.qwen3_config_from_shapes(self.source.shapes, self.source.prefix)
            targets = self._targets()
            model = te_mod.build_text_encoder(config, device="meta", dtype=self.compute)
            if self.storage in FP8:
                cast_linears(model)
            _stream_into(model, self.source, targets, device or self.device,
                         _float_dtype_for(self.storage, self.compute), progress)
            _check_complete(model, self.source)
            self.module = model.eval().requires_grad_(False)
        return self.module


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
