"""core.fastread: chunk planning, the parallel reader on CPU targets (pread staging, plain mapping, a
fake page-locking registrar), bounded in-flight memory, cleanup on early close and on errors, and the
CUDA registration path on a GPU."""
from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_nodes.core import fastread, st_io
from zimage_nodes.core.errors import CheckpointError
from zimage_nodes.core.fastread import (PAGE, Chunk, Piece, ReadStats, RegistrationError, plan_chunks, read_tensors,
                                        split_runs)
from zimage_nodes.core.st_io import TensorInfo, read_header, stream_tensors

MODES = ["pread", "mmap", "register"]


def _sample(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(300, 77, generator=g).to(torch.bfloat16),  # 46200 bytes: not a page multiple
        "a.bias": torch.randn(77, generator=g),
        "big": torch.randn(5 * PAGE + 123, generator=g),                   # larger than a chunk below
        "fp8.e4m3": torch.randn(1001, generator=g).to(torch.float8_e4m3fn),
        "fp8.e5m2": torch.randn(3, 5, generator=g).to(torch.float8_e5m2),
        "ids": torch.arange(33, dtype=torch.int64).reshape(3, 11),
        "mask": torch.rand(13, generator=g) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 7),
        "empty.bf16": torch.empty(4, 0, dtype=torch.bfloat16),
        "u16": torch.arange(9, dtype=torch.int32).to(torch.uint16),
    }


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    path = tmp_path / "sample.safetensors"
    save_file(_sample(), str(path))
    return path


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


class FakeRegistrar:
    """Records page-locked ranges; checks that live ranges never share a page; can refuse."""

    def __init__(self, fail_at: Optional[int] = None) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, int] = {}
        self.calls = 0
        self.max_live = 0
        self.fail_at = fail_at

    def register(self, ptr: int, nbytes: int) -> None:
        with self.lock:
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise RegistrationError("refused (test)")
            assert ptr % PAGE == 0
            first, last = ptr // PAGE, (ptr + nbytes - 1) // PAGE
            for p, n in self.live.items():
                assert last < p // PAGE or first > (p + n - 1) // PAGE, "two live registrations share a page"
            self.live[ptr] = nbytes
            self.max_live = max(self.max_live, len(self.live))

    def unregister(self, ptr: int) -> None:
        with self.lock:
            del self.live[ptr]


def _read(path: Path, names: list[str], mode: str, registrar: Optional[FakeRegistrar] = None,
          **kw) -> dict[str, torch.Tensor]:
    if mode == "register" and registrar is None:
        registrar = FakeRegistrar()
    out: dict[str, torch.Tensor] = {}
    for name, t in read_tensors(path, names, "cpu", kw.pop("dtype_for", lambda n, i: None), mode=mode,
                                registrar=registrar, **kw):
        assert name not in out
        out[name] = t
    return out


def _resources() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), threading.active_count()


# ================================================================ planning

def test_plan_chunks_covers_every_byte_once_on_the_grid() -> None:
    rng = random.Random(1)
    chunk = 4 * PAGE
    spans, offset = [], 8 + rng.randrange(1000)
    for _ in range(200):
        n = rng.choice([1, 3, PAGE - 1, PAGE, 2 * PAGE + 5, 9 * PAGE + 17, rng.randrange(1, 20000)])
        if rng.random() < 0.2:
            offset += rng.randrange(1, 3 * PAGE)  # a tensor that was not asked for
        spans.append((offset, n))
        offset += n
    chunks = plan_chunks(spans, chunk)
    covered: dict[int, list[tuple[int, int]]] = {}
    for c in chunks:
        assert c.start // chunk == (c.end - 1) // chunk, "a chunk crosses the grid"
        assert c.start == c.pieces[0].src and c.end == c.pieces[-1].src + c.pieces[-1].n
        for p in c.pieces:
            assert c.start <= p.src and p.src + p.n <= c.end and p.n > 0
            assert p.src - spans[p.tensor][0] == p.dst
            covered.setdefault(p.tensor, []).append((p.dst, p.n))
    for a, b in zip(chunks, chunks[1:]):
        assert (a.end - 1) // PAGE < b.start // PAGE, "two chunks share a page"
    for i, (_, n) in enumerate(spans):
        parts = sorted(covered[i])
        assert parts[0][0] == 0 and sum(m for _, m in parts) == n
        assert all(d + m == d2 for (d, m), (d2, _) in zip(parts, parts[1:]))


def test_plan_chunks_splits_a_tensor_larger_than_a_chunk() -> None:
    chunks = plan_chunks([(100, 3 * PAGE)], PAGE)
    assert [c.pieces for c in chunks] == [
        (Piece(0, 0, 100, PAGE - 100),), (Piece(0, PAGE - 100, PAGE, PAGE),),
        (Piece(0, 2 * PAGE - 100, 2 * PAGE, PAGE),), (Piece(0, 3 * PAGE - 100, 3 * PAGE, 100),)]
    assert chunks[0] == Chunk(100, PAGE, chunks[0].pieces)
    with pytest.raises(ValueError):
        plan_chunks([(0, 10)], PAGE + 1)
    with pytest.raises(ValueError):
        plan_chunks([(0, 0)], PAGE)


def test_split_runs_contiguous_and_bounded() -> None:
    pieces = [Piece(0, 0, 10, 100), Piece(1, 0, 110, 250), Piece(2, 5, 400, 30)]  # a gap before the last
    runs = split_runs(pieces, 128)
    assert [(a, b) for a, b, _ in runs] == [(10, 138), (138, 266), (266, 360), (400, 430)]
    for a, b, ps in runs:
        assert b - a <= 128 and ps[0].src == a and ps[-1].src + ps[-1].n == b
        assert all(p.src + p.n == q.src for p, q in zip(ps, ps[1:]))
    flat = [(p.tensor, p.dst, p.src, p.n) for _, _, ps in runs for p in ps]
    assert (1, 28, 138, 128) in flat and (1, 156, 266, 94) in flat and (2, 5, 400, 30) in flat


def test_header_offsets_point_at_the_data(sample_file: Path) -> None:
    h = read_header(sample_file)
    raw = sample_file.read_bytes()
    ref = _sample()
    for name, info in h.tensors.items():
        assert raw[info.offset:info.offset + info.nbytes] == ref[name].reshape(-1).view(torch.uint8).numpy().tobytes()


# ================================================================ reading, bit for bit

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 4])
def test_every_tensor_bit_for_bit(sample_file: Path, mode: str, threads: int) -> None:
    ref = load_file(str(sample_file))
    stats = ReadStats()
    got = _read(sample_file, list(ref), mode, threads=threads, chunk_bytes=PAGE, staging_bytes=3000,
                stats=stats)
    assert got.keys() == ref.keys()
    for name in ref:
        assert _same_bytes(got[name], ref[name]), name
    assert stats.mode == mode and stats.chunks >= 5 and stats.bytes == sum(
        t.numel() * t.element_size() for t in ref.values())
    if mode == "pread":
        assert stats.registered_chunks == 0 and stats.read_spans > stats.chunks
    else:
        assert stats.registered_chunks == stats.chunks and stats.read_spans == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_subset_with_default_sizes(sample_file: Path, mode: str) -> None:
    ref = load_file(str(sample_file))
    names = ["fp8.e5m2", "big", "empty", "scalar"]
    got = _read(sample_file, names, mode)
    assert sorted(got) == sorted(names)
    for name in names:
        assert _same_bytes(got[name], ref[name]), name


@pytest.mark.parametrize("mode", MODES)
def test_conversion_to_the_requested_dtype(sample_file: Path, mode: str) -> None:
    ref = load_file(str(sample_file))
    header = read_header(sample_file)
    seen: dict[str, TensorInfo] = {}

    def dtype_for(name: str, info: TensorInfo) -> Optional[torch.dtype]:
        seen[name] = info
        if info.dtype == "BF16":
            return torch.float8_e4m3fn
        return torch.float32 if info.dtype in ("F32", "F16", "F8_E4M3", "F8_E5M2") else None
    got = _read(sample_file, list(ref), mode, chunk_bytes=PAGE, dtype_for=dtype_for)
    assert seen == header.tensors
    for name, t in ref.items():
        want = dtype_for(name, header.tensors[name]) or t.dtype
        assert got[name].dtype == want and _same_bytes(got[name], t.to(want)), name


def test_many_tensors_tiny_budget_many_threads() -> None:
    """Small budget, tiny chunks and staging, more threads than cores, random sizes: no deadlock, every
    byte right, and never more unyielded memory than the budget plus the largest tensor."""
    import tempfile
    rng = random.Random(7)
    g = torch.Generator().manual_seed(7)
    tensors = {f"t{i:03d}": torch.randn(rng.choice([1, 5, 700, 3000, 11000]), generator=g).to(
        rng.choice([torch.bfloat16, torch.float32, torch.float8_e4m3fn])) for i in range(120)}
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "many.safetensors"
        save_file(tensors, str(path))
        ref = load_file(str(path))
        for mode in MODES:
            budget = 20000
            stats = ReadStats()
            result: dict[str, dict[str, torch.Tensor]] = {}

            def run() -> None:
                result["got"] = _read(path, list(ref), mode, threads=8, chunk_bytes=PAGE, staging_bytes=1500,
                                      budget_bytes=budget, stats=stats)
            th = threading.Thread(target=run, daemon=True)
            th.start()
            th.join(120)
            assert not th.is_alive(), f"{mode}: the read deadlocked"
            for name in ref:
                assert _same_bytes(result["got"][name], ref[name]), (mode, name)
            assert 0 < stats.peak_in_flight <= budget + largest, (mode, stats)


def test_in_flight_bounded_while_the_consumer_is_slow(sample_file: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(2048, generator=g) for i in range(40)}  # 8 KiB each
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    stats = ReadStats()
    it = read_tensors(path, list(tensors), "cpu", lambda n, i: None, mode="pread", threads=4,
                      chunk_bytes=PAGE, budget_bytes=3 * 8192, stats=stats)
    first = next(it)
    threading.Event().wait(0.2)  # the workers run ahead as far as the budget lets them
    assert stats.peak_in_flight <= 3 * 8192
    rest = dict(it)
    assert len(rest) == 39 and first[0] not in rest
    assert stats.peak_in_flight <= 3 * 8192


def test_a_slow_allocation_does_not_hold_up_the_tensors_already_allocated(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """After empty_cache every destination is a cudaMalloc. While one is slow, the workers go on copying into
    the tensors allocated before it and the caller goes on receiving them (nothing waits on a lock held
    across the allocation)."""
    g = torch.Generator().manual_seed(11)
    tensors = {f"w{i:02d}": torch.randn(3000, generator=g) for i in range(12)}  # 12 KB each: 3 pages
    path = tmp_path / "slow.safetensors"
    save_file(tensors, str(path))
    gate, calls, real = threading.Event(), {"n": 0}, fastread._CpuOps.alloc

    def alloc(self, nbytes):
        calls["n"] += 1
        if calls["n"] == 6:  # the sixth destination (file order) takes until the test lets it go
            assert gate.wait(30), "the test never released the slow allocation"
        return real(self, nbytes)
    monkeypatch.setattr(fastread._CpuOps, "alloc", alloc)
    got: list[str] = []
    done = threading.Event()

    def consume() -> None:
        for name, _t in read_tensors(path, list(tensors), "cpu", lambda n, i: None, mode="pread", threads=4,
                                     chunk_bytes=PAGE):
            got.append(name)
        done.set()
    th = threading.Thread(target=consume, daemon=True)
    th.start()
    first_five = sorted(tensors)[:5]
    for _ in range(200):
        if set(first_five) <= set(got):
            break
        threading.Event().wait(0.05)
    received_while_blocked = list(got)
    gate.set()
    th.join(30)
    assert done.is_set() and not th.is_alive()
    assert set(first_five) <= set(received_while_blocked), received_while_blocked
    assert sorted(got) == sorted(tensors)


# ================================================================ registration

def test_registered_chunks_never_overlap_and_are_all_released(sample_file: Path) -> None:
    ref = load_file(str(sample_file))
    reg = FakeRegistrar()
    got = _read(sample_file, list(ref), "register", registrar=reg, threads=3, chunk_bytes=PAGE)
    assert all(_same_bytes(got[n], ref[n]) for n in ref)
    assert reg.live == {} and reg.calls >= 5
    assert reg.max_live <= 2 * 3  # at most two chunks per worker


def test_refused_registration_falls_back_to_pread(sample_file: Path) -> None:
    ref = load_file(str(sample_file))
    reg = FakeRegistrar(fail_at=3)
    stats = ReadStats()
    got = _read(sample_file, list(ref), "register", registrar=reg, threads=2, chunk_bytes=PAGE, stats=stats)
    assert all(_same_bytes(got[n], ref[n]) for n in ref)
    assert reg.live == {}
    assert stats.fallback and "refused (test)" in stats.fallback
    assert stats.read_spans > 0 and 0 < stats.registered_chunks < stats.chunks
    assert fastread._register_refused is None  # a fake registrar's refusal is not remembered


def test_hybrid_splits_chunks_between_registering_and_reading_workers(
        sample_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hybrid mode: the first ZIMAGE_LOAD_REGISTER_WORKERS workers register their chunks, the others pread;
    every byte arrives once and every registration is released."""
    ref = load_file(str(sample_file))
    monkeypatch.setenv(fastread.ENV_REGISTER_WORKERS, "1")

    class SlowRegistrar(FakeRegistrar):  # as on a GPU, registering is slower than reading: the readers get chunks
        def register(self, ptr: int, nbytes: int) -> None:
            time.sleep(0.01)
            super().register(ptr, nbytes)
    reg = SlowRegistrar()
    stats = ReadStats()
    got = _read(sample_file, list(ref), "hybrid", registrar=reg, threads=3, chunk_bytes=PAGE, stats=stats)
    assert got.keys() == ref.keys() and all(_same_bytes(got[n], ref[n]) for n in ref)
    assert reg.live == {} and reg.max_live <= 2  # one registering worker, at most two chunks held
    assert stats.registered_chunks == reg.calls and 0 < stats.registered_chunks < stats.chunks
    assert stats.read_spans > 0


class AsyncLane:
    """A CPU lane whose copies run later, in order, on a thread of its own (like a CUDA stream), with
    random delays: a staging buffer reused or a chunk released before its copies ran shows up as wrong
    bytes or as a registrar complaint."""
    outstanding: set = set()
    lock = threading.Lock()

    def __init__(self) -> None:
        import queue
        self.q: queue.Queue = queue.Queue()
        self.rng = random.Random(threading.get_ident())
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            kind, a, b = job
            if kind == "copy":
                if self.rng.random() < 0.3:
                    threading.Event().wait(0.002)
                a.copy_(b)
                with AsyncLane.lock:
                    AsyncLane.outstanding.discard((id(self), b.data_ptr(), b.numel()))
            else:
                a.set()

    def wait(self, fence: object) -> None:
        pass

    def copy_all(self, pairs: list) -> None:
        for dst, src in pairs:
            with AsyncLane.lock:
                AsyncLane.outstanding.add((id(self), src.data_ptr(), src.numel()))
            self.q.put(("copy", dst, src))

    def record(self) -> object:
        ev = threading.Event()
        self.q.put(("event", ev, None))
        return ev

    def done(self, event: object) -> bool:
        return event is None or event.is_set()  # type: ignore[attr-defined]

    def sync(self, event: object) -> None:
        if event is None:
            self.synchronize()
        else:
            event.wait()  # type: ignore[attr-defined]

    def synchronize(self) -> None:
        self.sync(self.record())

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def close(self) -> None:
        self.q.put(None)
        self.th.join()


class CheckingRegistrar(FakeRegistrar):
    def unregister(self, ptr: int) -> None:
        n = self.live[ptr]
        with AsyncLane.lock:
            busy = [(p, m) for _, p, m in AsyncLane.outstanding if p < ptr + n and ptr < p + m]
        assert not busy, "a chunk was released while copies from it were still queued"
        super().unregister(ptr)


@pytest.mark.parametrize("mode", MODES)
def test_asynchronous_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The pending/drain bookkeeping with copies that complete late, as on a GPU."""
    monkeypatch.setattr(fastread._CpuOps, "lane", lambda self: AsyncLane())
    g = torch.Generator().manual_seed(9)
    tensors = _sample(4)
    tensors.update({f"w{i}": torch.randn(777 * (i + 1), generator=g) for i in range(25)})
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    ref = load_file(str(path))
    before = _resources()
    for budget in (1 << 30, 30000):
        reg = CheckingRegistrar()
        got = _read(path, list(ref), mode, registrar=reg, threads=4, chunk_bytes=PAGE, staging_bytes=2000,
                    budget_bytes=budget)
        assert all(_same_bytes(got[n], ref[n]) for n in ref)
        assert reg.live == {}
    assert _resources() == before


# ================================================================ cleanup and errors

@pytest.mark.parametrize("mode", MODES)
def test_early_close_leaks_nothing(tmp_path: Path, mode: str) -> None:
    g = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn(5000, generator=g) for i in range(60)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    before = _resources()
    reg = FakeRegistrar()
    it = read_tensors(path, list(tensors), "cpu", lambda n, i: None, mode=mode, registrar=reg, threads=4,
                      chunk_bytes=PAGE, budget_bytes=40000)
    name, t = next(it)
    assert torch.equal(t, tensors[name])
    it.close()
    assert _resources() == before
    assert reg.live == {}
    never_started = read_tensors(path, list(tensors), "cpu", lambda n, i: None, mode=mode, registrar=reg)
    never_started.close()
    assert _resources() == before


def test_stopping_between_tensors_through_stream_tensors_style_loop(tmp_path: Path) -> None:
    """The loader aborts (interrupt) by raising between tensors: the generator is dropped, not closed
    explicitly; everything must still be released."""
    tensors = {f"w{i}": torch.full((4000,), float(i)) for i in range(30)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    before = _resources()

    class Interrupted(Exception):
        pass

    def load() -> None:
        for i, _ in enumerate(read_tensors(path, list(tensors), "cpu", lambda n, i: None, mode="pread",
                                           threads=4, chunk_bytes=PAGE)):
            if i == 3:
                raise Interrupted
    with pytest.raises(Interrupted):
        load()
    assert _resources() == before


def test_missing_tensor_names_the_file(sample_file: Path) -> None:
    before = _resources()
    with pytest.raises(CheckpointError, match="sample.safetensors has no tensor 'nope'"):
        list(read_tensors(sample_file, ["a.bias", "nope"], "cpu", lambda n, i: None))
    assert _resources() == before
    with pytest.raises(ValueError, match="repeat"):
        list(read_tensors(sample_file, ["a.bias", "a.bias"], "cpu", lambda n, i: None))


def test_truncated_file(sample_file: Path) -> None:
    data = sample_file.read_bytes()
    sample_file.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="sample.safetensors is truncated"):
        list(read_tensors(sample_file, ["a.bias"], "cpu", lambda n, i: None))


def test_file_shrunk_after_its_header_was_read(sample_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fastread.read_header

    def read_then_truncate(path):
        h = real(path)
        Path(path).write_bytes(Path(path).read_bytes()[:-100])
        return h
    monkeypatch.setattr(fastread, "read_header", read_then_truncate)
    before = _resources()
    with pytest.raises(CheckpointError, match="sample.safetensors changed size"):
        list(read_tensors(sample_file, ["a.bias", "big"], "cpu", lambda n, i: None))
    assert _resources() == before


@pytest.mark.skipif(not hasattr(os, "preadv"), reason="positional reads only")
def test_short_read_and_read_error(sample_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = list(load_file(str(sample_file)))
    before = _resources()
    monkeypatch.setattr(fastread.os, "preadv", lambda fd, bufs, off: 0)
    with pytest.raises(CheckpointError, match="sample.safetensors is truncated"):
        list(read_tensors(sample_file, names, "cpu", lambda n, i: None, mode="pread", threads=3))
    assert _resources() == before

    def fail(fd, bufs, off):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(fastread.os, "preadv", fail)
    with pytest.raises(CheckpointError, match="Cannot read tensors from sample.safetensors") as e:
        list(read_tensors(sample_file, names, "cpu", lambda n, i: None, mode="pread", threads=3))
    assert "Input/output error" in str(e.value)
    assert _resources() == before


@pytest.mark.parametrize("mode", MODES)
def test_out_of_memory_in_a_worker_is_raised_as_itself(sample_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                      mode: str) -> None:
    calls = {"n": 0}
    real = fastread._CpuOps.alloc

    def alloc(self, nbytes):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, nbytes)
    monkeypatch.setattr(fastread._CpuOps, "alloc", alloc)
    reg = FakeRegistrar()
    before = _resources()
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        _read(sample_file, list(load_file(str(sample_file))), mode, registrar=reg, threads=2, chunk_bytes=PAGE)
    assert _resources() == before and reg.live == {}


# ================================================================ knobs and stream_tensors

def test_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fastread.ENV_THREADS, raising=False)
    assert fastread.load_threads() == max(1, min(8, os.cpu_count() or 1))
    monkeypatch.setenv(fastread.ENV_THREADS, "3")
    assert fastread.load_threads() == 3
    monkeypatch.setenv(fastread.ENV_THREADS, "lots")
    assert fastread.load_threads() == max(1, min(8, os.cpu_count() or 1))
    monkeypatch.setenv(fastread.ENV_CHUNK_MB, "32")
    assert fastread.chunk_bytes_setting() == 32 << 20
    for value, on in [("", True), ("1", True), ("pread", True), ("0", False), ("off", False), ("False", False)]:
        monkeypatch.setenv(fastread.ENV_MODE, value)
        assert fastread.enabled() is on


def test_stream_tensors_uses_fastread_for_cuda_only(good_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def fake(path, names, device, dtype_for) -> Iterator[tuple[str, torch.Tensor]]:
        calls.append((Path(path), list(names), torch.device(device)))
        yield from ((n, torch.zeros(1)) for n in names)
    monkeypatch.setattr(fastread, "read_tensors", fake)
    monkeypatch.delenv(fastread.ENV_MODE, raising=False)
    assert [n for n, _ in stream_tensors(good_file, iter(["x", "y"]), "cuda:0", lambda n, i: None)] == ["x", "y"]
    assert calls == [(good_file, ["x", "y"], torch.device("cuda:0"))]
    assert [n for n, _ in stream_tensors(good_file, ["x"], "cpu", lambda n, i: None)] == ["x"]
    assert len(calls) == 1
    monkeypatch.setenv(fastread.ENV_MODE, "0")
    monkeypatch.setattr(st_io, "_convert", lambda t, device, dtype: t)  # no CUDA here
    assert [n for n, _ in stream_tensors(good_file, ["x"], "cuda", lambda n, i: None)] == ["x"]
    assert len(calls) == 1


def test_default_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """pread by default (faster on the H200 host); registration only when asked for and not refused."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(fastread.ENV_MODE, raising=False)
    monkeypatch.setattr(fastread, "_register_refused", None)
    assert fastread._default_mode(torch.device("cpu")) == "pread"
    assert fastread._default_mode(cuda) == "pread"
    monkeypatch.setenv(fastread.ENV_MODE, "register")
    assert fastread._default_mode(cuda) == ("register" if hasattr(fastread.mmap, "MADV_DONTNEED") else "pread")
    assert fastread._default_mode(torch.device("cpu")) == "pread"
    monkeypatch.setenv(fastread.ENV_MODE, "hybrid")
    assert fastread._default_mode(cuda) == ("hybrid" if hasattr(fastread.mmap, "MADV_DONTNEED") else "pread")
    monkeypatch.setattr(fastread, "_register_refused", "refused before")
    assert fastread._default_mode(cuda) == "pread"


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file({"x": torch.ones(3), "y": torch.zeros(2, dtype=torch.bfloat16)}, str(path))
    return path


# ================================================================ on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["register", "pread"])
def test_cuda_bit_for_bit_and_conversion(tmp_path: Path, mode: str) -> None:
    g = torch.Generator().manual_seed(11)
    tensors = _sample()
    tensors.update({f"layer{i}": torch.randn(1000 + 999 * i, 333, generator=g).to(torch.bfloat16) for i in range(6)})
    path = tmp_path / "gpu.safetensors"
    save_file(tensors, str(path))
    ref = load_file(str(path))
    stats = ReadStats()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the caller's current stream need not be the default one
        got = dict(read_tensors(path, list(ref), "cuda", lambda n, i: None, mode=mode, chunk_bytes=1 << 20,
                                stats=stats))
        conv = dict(read_tensors(path, list(ref), "cuda", lambda n, i: torch.float32 if i.dtype == "BF16" else None,
                                 mode=mode, chunk_bytes=1 << 20, budget_bytes=1 << 20))
    torch.cuda.synchronize()
    for name, t in ref.items():
        assert got[name].is_cuda and _same_bytes(got[name], t), name
        want = torch.float32 if t.dtype == torch.bfloat16 else t.dtype
        assert _same_bytes(conv[name], t.to(want)), name
    if mode == "register":
        assert stats.registered_chunks == stats.chunks or stats.fallback, stats
    else:
        assert stats.read_spans > 0


@pytest.mark.gpu
def test_cuda_registrar_registers_and_unregisters(tmp_path: Path) -> None:
    """Run in a thread of its own, as the reader does: a refused registration leaves the CUDA runtime's
    last error set in the calling thread."""
    import mmap as mmap_mod
    import warnings
    path = tmp_path / "r.bin"
    path.write_bytes(os.urandom(3 * PAGE + 5))
    torch.cuda.init()
    reg = fastread.CudaHostRegistrar()
    outcome: dict[str, object] = {}

    def attempt() -> None:
        with open(path, "rb") as f:
            mm = mmap_mod.mmap(f.fileno(), 0, access=mmap_mod.ACCESS_READ)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                host = torch.frombuffer(mm, dtype=torch.uint8)
            try:
                reg.register(host.data_ptr(), host.numel())
            except RegistrationError as e:
                outcome["refused"] = str(e)
                return
            dst = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
            dst.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            reg.unregister(host.data_ptr())
            outcome["equal"] = torch.equal(dst.cpu(), host)
            del host
        finally:
            mm.close()
    th = threading.Thread(target=attempt)
    th.start()
    th.join()
    if "refused" in outcome:
        pytest.skip(f"read-only registration refused here: {outcome['refused']}")
    assert outcome.get("equal") is True


@pytest.mark.gpu
def test_cuda_stream_tensors_early_close_and_errors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {f"w{i}": torch.randn(300_000, generator=g).to(torch.bfloat16) for i in range(40)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    got = dict(stream_tensors(path, list(tensors), "cuda", lambda n, i: torch.float8_e4m3fn))
    for name, t in tensors.items():
        assert _same_bytes(got[name], t.to(torch.float8_e4m3fn)), name
    del got
    before = _resources()
    it = read_tensors(path, list(tensors), "cuda", lambda n, i: None, chunk_bytes=1 << 20, budget_bytes=2 << 20)
    next(it)
    it.close()
    assert _resources() == before
    with pytest.raises(CheckpointError, match="w.safetensors has no tensor 'nope'"):
        list(stream_tensors(path, ["w1", "nope"], "cuda", lambda n, i: None))
    assert _resources() == before
