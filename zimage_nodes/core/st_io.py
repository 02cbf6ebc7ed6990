"""safetensors header reading and validation, and one-tensor-at-a-time streaming.

``read_header`` parses the 8-byte length and the JSON header itself, so that every way a file can be
wrong (a pickle, a truncated download, a corrupt header) becomes a ``CheckpointError`` naming the file
before anything is allocated. To a CPU, tensor data is read through ``safetensors.safe_open`` (memory
mapped), one tensor at a time; to a CUDA device, through ``fastread`` (parallel DMA from the page cache,
see that module; ``ZIMAGE_FASTREAD=0`` restores the one-at-a-time path). Pickle files are refused from
their name or first bytes: nothing here unpickles.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError

# safetensors dtype name -> (bytes per element, torch dtype)
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
    "I16": (2, torch.int16),
    "U16": (2, torch.uint16),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32),
    "U32": (4, torch.uint32),
    "F32": (4, torch.float32),
    "I64": (8, torch.int64),
    "U64": (8, torch.uint64),
    "F64": (8, torch.float64),
}
TORCH_TO_ST: dict[torch.dtype, str] = {td: name for name, (_, td) in DTYPES.items()}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTOCOLS = range(2, 6)  # a pickle stream starts with PROTO (0x80) and its version


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; dtype is the header's name ("BF16", "F8_E4M3", ...).

    ``offset`` is the absolute byte offset of the tensor's data in the file ``read_header`` read it from
    (-1 when unknown); it takes no part in equality, hashing or repr."""
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = field(default=-1, compare=False, repr=False)


@dataclass
class Header:
    """The validated header of a safetensors file (or of the merged shards of a folder)."""
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    def total_bytes(self) -> int:
        """Bytes of tensor data."""
        return sum(v.nbytes for v in self.tensors.values())


def _pickle_error(path: Path, found: str) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is a pickle (PyTorch .ckpt/.pt/.bin) file; this pack never unpickles a file, "
        "because unpickling can run arbitrary code.",
        found=f"{found} ({path})",
        expected="a .safetensors file",
        fix=f"download the .safetensors version of this model (e.g. {path.stem}.safetensors) "
            "from the same source and pick that file instead")


def _corrupt(path: Path, what: str, found: str, expected: str) -> CheckpointError:
    return CheckpointError(f"{path.name} is not a valid safetensors file: {what}.",
                           found=f"{found} ({path})", expected=expected,
                           fix="download the file again; if it keeps failing, the source file is damaged")


def _parse_entry(path: Path, name: str, entry: object) -> tuple[TensorInfo, int, int]:
    """Validate one header entry; returns (info, begin, end) with offsets relative to the data."""
    if not isinstance(entry, dict):
        raise _corrupt(path, f"the header entry of tensor '{name}' is not an object", repr(entry)[:200],
                       "{dtype, shape, data_offsets}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(
            f"{path.name}: tensor '{name}' has a dtype this pack cannot read.",
            found=f"dtype {dtype!r} ({path})", expected=", ".join(DTYPES),
            fix="use a bf16, fp16, fp32 or fp8 (e4m3fn/e5m2) version of this model")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor '{name}' has an invalid shape", repr(shape)[:200],
                       "a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor '{name}' has invalid data_offsets", repr(offsets)[:200],
                       "[begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype][0]
    begin, end = offsets
    if end - begin != nbytes:
        raise _corrupt(path, f"the data_offsets of tensor '{name}' do not match its shape and dtype",
                       f"{end - begin} bytes at [{begin}, {end}) for {dtype} {tuple(shape)}",
                       f"{nbytes} bytes")
    return TensorInfo(dtype, tuple(shape), nbytes), begin, end


def read_header(path: str | Path) -> Header:
    """Read and validate a safetensors header; reads the first 8 bytes and the header only."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path, f"the extension {path.suffix}")
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            if file_size == 0:
                raise CheckpointError(f"{path.name} is empty (0 bytes).", found=str(path),
                                      expected="a safetensors model file",
                                      fix="the download or copy failed: download the file again")
            looks_safetensors = len(head) == 9 and head[8:9] == b"{"
            if not looks_safetensors:
                if head.startswith(_ZIP_MAGIC):
                    raise _pickle_error(path, "a zip archive (torch.save format) at the start of the file")
                if head[0] == 0x80 and len(head) > 1 and head[1] in _PICKLE_PROTOCOLS:
                    raise _pickle_error(path, f"a pickle stream (protocol {head[1]}) at the start of the file")
            if file_size < 8:
                raise _corrupt(path, "it is shorter than the 8-byte header length", f"{file_size} bytes",
                               "at least 8 bytes")
            (n,) = struct.unpack("<Q", head[:8])
            if n > file_size - 8:
                raise _corrupt(path, "its header length is larger than the file",
                               f"header length {n} bytes, file {file_size} bytes",
                               f"a header length of at most {file_size - 8} bytes")
            if n > MAX_HEADER_BYTES:
                raise _corrupt(path, "its header is larger than safetensors allows",
                               f"header length {n} bytes", f"at most {MAX_HEADER_BYTES} bytes")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"Cannot read {path.name}.", found=f"{e.strerror or e} ({path})",
                              expected="a readable file", fix="check that the file exists and is readable") from e
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(path, "its header is not valid JSON", str(e)[:200], "a JSON object") from e
    if not isinstance(parsed, dict):
        raise _corrupt(path, "its header is not a JSON object", type(parsed).__name__, "a JSON object")

    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "its __metadata__ is not a map of strings", repr(metadata)[:200],
                       "{string: string}")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    data_start = 8 + n
    for name, entry in parsed.items():
        info, begin, end = _parse_entry(path, name, entry)
        tensors[name] = TensorInfo(info.dtype, info.shape, info.nbytes, offset=data_start + begin)
        spans.append((begin, end, name))

    data_size = file_size - 8 - n
    data_end = max((e for _, e, _ in spans), default=0)
    if data_end > data_size:
        missing = data_end - data_size
        beyond = sorted(name for _, e, name in spans if e > data_size)
        raise CheckpointError(
            f"{path.name} is truncated (an incomplete download or copy): {missing} bytes are missing.",
            found=f"{file_size} bytes; {len(beyond)} tensor(s) reach past the end of the file, "
                  f"e.g. '{beyond[0]}' ({path})",
            expected=f"{8 + n + data_end} bytes",
            fix="download the file again and check that its size matches the size on the download page")
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise _corrupt(path, "its tensors overlap or leave gaps",
                           f"tensor '{name}' starts at byte {begin} of the data", f"byte {cursor}")
        cursor = end
    if data_end != data_size:
        raise _corrupt(path, "it has bytes after the last tensor",
                       f"{data_size - data_end} extra bytes", f"{8 + n + data_end} bytes in all")
    return Header(path=path, tensors=tensors, metadata=dict(metadata), file_size=file_size)


def torch_dtype(info: TensorInfo) -> torch.dtype:
    """The torch dtype of a header entry."""
    return DTYPES[info.dtype][1]


def _convert(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Move to device and dtype, converting on whichever side moves fewer bytes."""
    if dtype is None or dtype == t.dtype:
        return t.to(device)
    if t.device.type == "cpu" and dtype.itemsize < t.dtype.itemsize:
        return t.to(dtype).to(device)
    return t.to(device).to(dtype)


def stream_tensors(path: str | Path, names: Iterable[str], device: torch.device | str,
                   dtype_for: Callable[[str, TensorInfo], torch.dtype | None]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) once for each name, on ``device`` in ``dtype_for(name, info)`` (None keeps the
    file's dtype). No full host copy of the file is made.

    To a CUDA device (unless ``ZIMAGE_FASTREAD=0``) the tensors are read by ``fastread.read_tensors``:
    in parallel, yielded in the order they complete (not the order of ``names``), each ready for use on
    the caller's current stream. Elsewhere they are read from the memory-mapped file one at a time, in
    the order of ``names``. Every failure is a ``CheckpointError`` naming the file (a CUDA out-of-memory
    error stays one)."""
    path = Path(path)
    device = torch.device(device)
    names = list(names)
    if device.type == "cuda" and len(set(names)) == len(names):
        from . import fastread  # imported here: fastread imports this module
        if fastread.enabled():
            yield from fastread.read_tensors(path, names, device, dtype_for)
            return
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise missing_tensor(path, name)
                t = f.get_tensor(name)
                info = TensorInfo(TORCH_TO_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size())
                yield name, _convert(t, device, dtype_for(name, info))
                del t
    except (SafetensorError, OSError) as e:
        raise unreadable(path, e) from e


def missing_tensor(path: Path, name: str) -> CheckpointError:
    """The error for a tensor ``name`` that the file ``path`` lacks."""
    return CheckpointError(f"{path.name} has no tensor '{name}'.", found=str(path),
                           expected=f"a tensor named '{name}'", fix="pick the complete, unmodified model file")


def unreadable(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a file whose tensor data cannot be read (``exc`` says why)."""
    return CheckpointError(f"Cannot read tensors from {path.name}.", found=f"{exc} ({path})",
                           expected="a valid safetensors file", fix="download the file again")


def set_module_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` ("a.b.weight") of a (meta-built) module by ``value``.

    A parameter stays an ``nn.Parameter`` (requires_grad False); a buffer stays a buffer."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        old = owner._parameters[attr]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the module's {tuple(old.shape)}")
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        old = owner._buffers[attr]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the module's {tuple(old.shape)}")
        owner._buffers[attr] = value
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer '{name}'")
