"""core.st_io: header parsing, every bad-file case, streaming and set_module_tensor."""
from __future__ import annotations

import builtins
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from zimage_nodes.core import st_io
from zimage_nodes.core.errors import CheckpointError
from zimage_nodes.core.st_io import Header, TensorInfo, read_header, set_module_tensor, stream_tensors


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(4, generator=g),
        "fp8.e4m3": torch.randn(2, 5, generator=g).to(torch.float8_e4m3fn),
        "fp8.e5m2": torch.randn(3, generator=g).to(torch.float8_e5m2),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file(_sample(), str(path), metadata={"format": "pt", "note": "x"})
    return path


def _raw_file(path: Path, header: object, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _message(exc: pytest.ExceptionInfo[CheckpointError]) -> str:
    return str(exc.value)


def test_read_header(good: Path) -> None:
    h = read_header(good)
    assert h.path == good and h.file_size == good.stat().st_size
    assert h.metadata == {"format": "pt", "note": "x"}
    assert h.tensors["a.weight"] == TensorInfo("BF16", (4, 3), 24)
    assert h.tensors["a.bias"] == TensorInfo("F32", (4,), 16)
    assert h.tensors["fp8.e4m3"] == TensorInfo("F8_E4M3", (2, 5), 10)
    assert h.tensors["fp8.e5m2"] == TensorInfo("F8_E5M2", (3,), 3)
    assert h.shapes()["ids"] == (2, 3)
    assert h.total_bytes() == 24 + 16 + 10 + 3 + 48


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    assert "empty.safetensors is empty (0 bytes)" in _message(e)


def test_shorter_than_length_field(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match="short.safetensors is not a valid safetensors file"):
        read_header(path)


def test_header_length_beyond_file(good: Path) -> None:
    raw = bytearray(good.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    good.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        read_header(good)
    assert "good.safetensors" in _message(e) and "header length is larger than the file" in _message(e)


@pytest.mark.parametrize("flip", ["utf8", "syntax"])
def test_flipped_header_bytes(good: Path, flip: str) -> None:
    raw = bytearray(good.read_bytes())
    i = raw.index(b'"dtype"')
    if flip == "utf8":
        raw[i + 2] ^= 0xFF  # no longer UTF-8
    else:
        raw[i + len(b'"dtype"')] = ord("#")  # the ':' after "dtype"
    good.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        read_header(good)
    assert "good.safetensors" in _message(e) and "header is not valid JSON" in _message(e)


def test_header_not_an_object(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "list.safetensors", [1, 2, 3], b"")
    with pytest.raises(CheckpointError, match="list.safetensors .*not a JSON object"):
        read_header(path)


def test_truncated_download(good: Path) -> None:
    full = good.read_bytes()
    good.write_bytes(full[:-20])
    with pytest.raises(CheckpointError) as e:
        read_header(good)
    msg = _message(e)
    assert "good.safetensors is truncated" in msg and "20 bytes are missing" in msg
    assert f"Expected: {len(full)} bytes" in msg and "download the file again" in msg


def test_offsets_inconsistent_with_shape(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    path = _raw_file(tmp_path / "bad.safetensors", header, bytes(12))
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    assert "bad.safetensors" in _message(e) and "do not match its shape and dtype" in _message(e)
    assert "16 bytes" in _message(e)


def test_unknown_dtype(tmp_path: Path) -> None:
    header = {"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}
    path = _raw_file(tmp_path / "q.safetensors", header, bytes(4))
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    assert "q.safetensors" in _message(e) and "'Q4_K'" in _message(e)


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = _raw_file(tmp_path / "ov.safetensors", header, bytes(24))
    with pytest.raises(CheckpointError, match="overlap or leave gaps"):
        read_header(path)


def test_bytes_after_last_tensor(good: Path) -> None:
    good.write_bytes(good.read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError, match="8 extra bytes"):
        read_header(good)


class _ReadSpy:
    """Counts the bytes st_io reads through ``open``."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.read_bytes = 0

    def __call__(self, path, mode="r", *args, **kwargs):
        self.opened.append(str(path))
        f = builtins.open(path, mode, *args, **kwargs)
        spy = self

        class Wrapped:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def read(self, n=-1):
                data = f.read(n)
                spy.read_bytes += len(data)
                return data

            def seek(self, *a):
                return f.seek(*a)
        return Wrapped()


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> _ReadSpy:
    def boom(*a, **k):
        raise AssertionError("a pickle was loaded")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    spy = _ReadSpy()
    monkeypatch.setattr(st_io, "open", spy, raising=False)
    return spy


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain"])
def test_pickle_content_refused_from_first_bytes(tmp_path: Path, fmt: str, no_unpickling: _ReadSpy) -> None:
    path = tmp_path / "model.safetensors"  # the name does not give it away
    if fmt == "zip":
        torch.save({"w": torch.ones(3)}, path)
    elif fmt == "legacy":
        torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    msg = _message(e)
    assert "model.safetensors is a pickle" in msg and "never unpickles" in msg and ".safetensors version" in msg
    assert no_unpickling.read_bytes <= 9


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_extension_refused_unopened(tmp_path: Path, suffix: str, no_unpickling: _ReadSpy) -> None:
    path = tmp_path / f"z_image_turbo{suffix}"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    msg = _message(e)
    assert f"z_image_turbo{suffix} is a pickle" in msg and "z_image_turbo.safetensors" in msg
    assert no_unpickling.opened == []


def test_valid_header_reads_only_the_header(good: Path, no_unpickling: _ReadSpy) -> None:
    h = read_header(good)
    (n,) = struct.unpack("<Q", good.read_bytes()[:8])
    assert no_unpickling.read_bytes == 9 + n < h.file_size


def test_stream_tensors_dtypes_and_order(good: Path) -> None:
    ref = _sample()
    names = ["fp8.e4m3", "a.weight", "fp8.e5m2", "a.bias"]
    got = list(stream_tensors(good, names, "cpu", lambda n, i: None))
    assert [n for n, _ in got] == names
    for name, t in got:
        assert t.dtype == ref[name].dtype and torch.equal(t.view(torch.uint8), ref[name].view(torch.uint8))
    seen: list[tuple[str, TensorInfo]] = []

    def to_f32(name: str, info: TensorInfo) -> torch.dtype:
        seen.append((name, info))
        return torch.float32
    out = dict(stream_tensors(good, names, torch.device("cpu"), to_f32))
    assert seen[0] == ("fp8.e4m3", TensorInfo("F8_E4M3", (2, 5), 10))
    for name in names:
        assert out[name].dtype == torch.float32 and torch.equal(out[name], ref[name].float())


def test_stream_tensors_one_at_a_time(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real_safe_open = st_io.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.inner = real_safe_open(*a, **k)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            reads.append(name)
            return self.f.get_tensor(name)
    monkeypatch.setattr(st_io, "safe_open", Counting)
    it = stream_tensors(good, ["a.weight", "a.bias", "ids"], "cpu", lambda n, i: None)
    assert next(it)[0] == "a.weight" and reads == ["a.weight"]
    assert next(it)[0] == "a.bias" and reads == ["a.weight", "a.bias"]


def test_stream_tensors_missing_name(good: Path) -> None:
    with pytest.raises(CheckpointError, match="good.safetensors has no tensor 'nope'"):
        list(stream_tensors(good, ["a.bias", "nope"], "cpu", lambda n, i: None))


def test_set_module_tensor_on_meta_module() -> None:
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    w = torch.randn(4, 3)
    set_module_tensor(m, "0.weight", w)
    assert isinstance(m[0].weight, nn.Parameter) and not m[0].weight.requires_grad
    assert m[0].weight.data_ptr() == w.data_ptr()
    set_module_tensor(m, "1.running_mean", torch.ones(4))
    assert "1.running_mean" in dict(m.named_buffers()) and not isinstance(m[1].running_mean, nn.Parameter)
    set_module_tensor(m, "0.bias", torch.zeros(4, dtype=torch.float8_e4m3fn))
    assert m[0].bias.dtype == torch.float8_e4m3fn and isinstance(m[0].bias, nn.Parameter)
    assert [n for n, p in m.named_parameters() if p.is_meta] == ["1.weight", "1.bias"]
    with pytest.raises(ValueError, match="does not match"):
        set_module_tensor(m, "1.weight", torch.ones(5))
    with pytest.raises(KeyError):
        set_module_tensor(m, "0.nothing", torch.ones(1))


def test_header_of_merged_shards_is_plain_data(good: Path) -> None:
    h = read_header(good)
    merged = Header(path=good.parent, tensors=dict(h.tensors), metadata={}, file_size=h.file_size)
    assert merged.shapes() == h.shapes() and merged.total_bytes() == h.total_bytes()


def test_tensor_info_offset_locates_the_data_and_is_not_part_of_identity(good: Path) -> None:
    h = read_header(good)
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert min(i.offset for i in h.tensors.values()) == 8 + n
    info = h.tensors["a.weight"]
    assert raw[info.offset:info.offset + info.nbytes] == _sample()["a.weight"].view(torch.uint8).numpy().tobytes()
    plain = TensorInfo("BF16", (4, 3), 24)
    assert plain.offset == -1 and info == plain and hash(info) == hash(plain) and repr(info) == repr(plain)
