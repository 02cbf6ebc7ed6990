"""Parallel reading of a safetensors file straight into device tensors (what ``st_io.stream_tensors``
uses when the target is a CUDA device).

``read_tensors(path, names, device, dtype_for)`` keeps ``stream_tensors``' contract: it yields
``(name, tensor)`` once for each name, the tensor on ``device`` in ``dtype_for(name, info)`` (None keeps
the file's dtype), and every failure is a ``CheckpointError`` naming the file (a CUDA out-of-memory error
is raised as itself). Differences: tensors are yielded in the order they complete, not the order of
``names``; a name the file lacks is reported before anything is read.

How the bytes travel. The header's offsets cut the requested tensors' bytes into pieces on a fixed grid
of page-aligned chunks (``plan_chunks``). Worker threads take the chunks in file order, each with its own
CUDA stream, and copy every piece into its tensor's destination bytes:

* **pread** (the default): each worker reads its chunk in 16 MiB pieces with ``os.preadv`` into a ring
  of three pinned buffers (PyTorch's pinned-memory cache keeps them for the next load) and copies them on
  its stream. On an H200 host (16 cores) 12 threads read the three full-size files from the page cache
  at 45.6 GB/s (bench/read_sweep.py, docs/BENCHMARKS.md).
* **registered mapping** (``ZIMAGE_FASTREAD=register``, Linux): the file is memory-mapped read-only and
  each chunk's pages are page-locked in place with ``cudaHostRegister(..., cudaHostRegisterReadOnly)``, so
  the GPU copies straight from the page cache with no staging memory; a worker keeps
  ``ZIMAGE_LOAD_HOLD_CHUNKS`` chunks registered and then unregisters the oldest (and, with
  ``ZIMAGE_LOAD_DROP_PAGES=1``, drops its pages from this process's mapping). Chunks never share a page,
  so two registrations never overlap. It measured slower than pread (at best 28.9 GB/s, one thread,
  256 MiB chunks; more threads did not help, so registering and unregistering probably serialise in the
  driver, not measured directly). A refused registration falls back to pread and is remembered for the
  rest of the process.
* **hybrid** (``ZIMAGE_FASTREAD=hybrid``, experimental, not yet measured on a GPU): the first
  ``ZIMAGE_LOAD_REGISTER_WORKERS`` workers (default 1) register their chunks as above while the others pread,
  all taking chunks from the one queue; the idea is that the GPU's copy engines read registered pages while
  the CPU copies others, so the two rates might add up towards the pinned copy rate
  (bench/load_profile.py measures it).

Device memory. Destination tensors (raw bytes in the file's dtype) are allocated in file order on the
caller's current stream (so its caching-allocator pool gets them back), and a worker's stream waits on
that stream before writing into them. One thread of the read allocates them, ahead of the workers, with no
lock held while it allocates: after ``empty_cache`` (ComfyUI empties the cache when it unloads a model)
every allocation is a ``cudaMalloc``, and the workers keep copying and the caller keeps receiving tensors
meanwhile (on the H200 host the reader's first pass over the three files, its allocations included, took
0.72 s against 0.45 s once the allocator had cached the memory; bench/results/h200_read_sweep.json). At
most ``budget_bytes`` (1 GiB) of allocated tensors that have not been yielded yet exist at a time, plus one
tensor larger than that. A tensor is yielded only after its copies have completed (host-synchronized); a
conversion to another dtype then runs on the caller's current stream and the raw tensor is dropped. Host
memory: no copy of the file; the pread path holds ``threads x 3 x 16 MiB`` pinned.

Cleanup. Closing the generator (or an error, or the caller stopping between tensors) stops the
workers and the allocation thread, waits for their copies, unregisters every chunk, joins the threads and
closes the file and the mapping before ``close()`` returns.

Environment knobs (read at each call):

* ``ZIMAGE_FASTREAD``: ``0`` (or ``off``/``false``/``no``) restores the one-tensor-at-a-time
  ``safe_open`` path; ``register`` uses the registered mapping; ``hybrid`` mixes the two; anything else
  (default): pread.
* ``ZIMAGE_LOAD_THREADS``: worker threads (default ``min(12, os.cpu_count())``).
* ``ZIMAGE_LOAD_CHUNK_MB``: the chunk size in MiB (default 64), a tuning knob.
* ``ZIMAGE_LOAD_HOLD_CHUNKS`` (default 2), ``ZIMAGE_LOAD_DROP_PAGES`` (default off): registered and hybrid modes.
* ``ZIMAGE_LOAD_REGISTER_WORKERS`` (default 1): hybrid mode only.
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import traceback
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

import torch

from .errors import CheckpointError
from .st_io import DTYPES, TensorInfo, missing_tensor, read_header, unreadable

logger = logging.getLogger(__name__)

ENV_MODE = "ZIMAGE_FASTREAD"
ENV_THREADS = "ZIMAGE_LOAD_THREADS"
ENV_CHUNK_MB = "ZIMAGE_LOAD_CHUNK_MB"
ENV_HOLD = "ZIMAGE_LOAD_HOLD_CHUNKS"     # registered chunks a worker keeps before releasing the oldest
ENV_REGISTER_WORKERS = "ZIMAGE_LOAD_REGISTER_WORKERS"  # hybrid mode: workers that register, the rest pread
ENV_DROP = "ZIMAGE_LOAD_DROP_PAGES"      # 1: drop a released chunk's pages from the mapping (madvise)

PAGE = mmap.PAGESIZE
MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 64 * MiB
DEFAULT_BUDGET_BYTES = 1024 * MiB
STAGING_BYTES = 16 * MiB
STAGING_SLOTS = 3
MAX_THREADS = 12
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly

_OFF = ("0", "off", "false", "no")
_register_refused: Optional[str] = None  # why cudaHostRegister failed once in this process


# ================================================================ knobs

def enabled() -> bool:
    """False when ``ZIMAGE_FASTREAD`` turns the fast path off."""
    return os.environ.get(ENV_MODE, "").strip().lower() not in _OFF


def _int_env(name: str, default: int) -> int:
    """A positive integer from the environment (at least 1), or ``default`` when unset or not a number."""
    raw = os.environ.get(name, "").strip()
    try:
        return max(1, int(raw)) if raw else default
    except ValueError:
        logger.warning("%s=%r is not a number; using the default", name, raw)
        return default


def load_threads() -> int:
    """``ZIMAGE_LOAD_THREADS`` (at most 64), or ``min(12, os.cpu_count())``; at least 1."""
    return min(64, _int_env(ENV_THREADS, max(1, min(MAX_THREADS, os.cpu_count() or 1))))


def hold_chunks() -> int:
    """``ZIMAGE_LOAD_HOLD_CHUNKS``: registered chunks per worker before the oldest is released (default 2)."""
    return _int_env(ENV_HOLD, 2)


def drop_pages() -> bool:
    """``ZIMAGE_LOAD_DROP_PAGES=1``: madvise(DONTNEED) a released chunk (smaller RSS, more TLB work)."""
    return os.environ.get(ENV_DROP, "").strip().lower() in ("1", "on", "true", "yes")


def register_workers_setting() -> int:
    """``ZIMAGE_LOAD_REGISTER_WORKERS``: in hybrid mode, the workers that register chunks (default 1)."""
    return _int_env(ENV_REGISTER_WORKERS, 1)


def chunk_bytes_setting() -> int:
    """``ZIMAGE_LOAD_CHUNK_MB`` in bytes, or 64 MiB."""
    return _int_env(ENV_CHUNK_MB, DEFAULT_CHUNK_BYTES // MiB) * MiB


# ================================================================ planning (pure)

@dataclass(frozen=True)
class Piece:
    """``n`` bytes of tensor ``tensor`` (an index into the planned list): file offset ``src``, offset
    ``dst`` in the tensor's bytes."""
    tensor: int
    dst: int
    src: int
    n: int


@dataclass(frozen=True)
class Chunk:
    """The requested bytes inside one cell of the chunk grid: file offsets [start, end), the pieces in
    file order."""
    start: int
    end: int
    pieces: tuple[Piece, ...]


def plan_chunks(spans: Sequence[tuple[int, int]], chunk_bytes: int) -> list[Chunk]:
    """Cut tensors ``spans[i] = (file offset, nbytes)`` (sorted by offset, not overlapping, nbytes > 0)
    on the grid of ``chunk_bytes`` (a multiple of the page size): one ``Chunk`` per grid cell that holds
    requested bytes. Two chunks never share a page."""
    if chunk_bytes <= 0 or chunk_bytes % PAGE:
        raise ValueError(f"chunk_bytes must be a positive multiple of {PAGE}, not {chunk_bytes}")
    chunks: list[Chunk] = []
    cell: Optional[int] = None
    pieces: list[Piece] = []
    for index, (offset, nbytes) in enumerate(spans):
        if nbytes <= 0:
            raise ValueError(f"tensor {index} has {nbytes} bytes; plan only tensors with data")
        pos, end = offset, offset + nbytes
        while pos < end:
            here = pos // chunk_bytes
            if here != cell:
                if pieces:
                    chunks.append(Chunk(pieces[0].src, pieces[-1].src + pieces[-1].n, tuple(pieces)))
                cell, pieces = here, []
            n = min(end, (here + 1) * chunk_bytes) - pos
            pieces.append(Piece(index, pos - offset, pos, n))
            pos += n
    if pieces:
        chunks.append(Chunk(pieces[0].src, pieces[-1].src + pieces[-1].n, tuple(pieces)))
    return chunks


def split_runs(pieces: Sequence[Piece], max_bytes: int) -> list[tuple[int, int, list[Piece]]]:
    """Group ``pieces`` (file order) into reads ``(start, end, pieces)``: contiguous file ranges of at
    most ``max_bytes``, splitting pieces where needed."""
    runs: list[tuple[int, int, list[Piece]]] = []
    cur: list[Piece] = []
    start = end = 0
    for p in pieces:
        pos, stop = p.src, p.src + p.n
        while pos < stop:
            if cur and (pos != end or end - start >= max_bytes):
                runs.append((start, end, cur))
                cur = []
            if not cur:
                start = end = pos
            n = min(stop - pos, max_bytes - (end - start))
            cur.append(Piece(p.tensor, p.dst + pos - p.src, pos, n))
            end += n
            pos += n
    if cur:
        runs.append((start, end, cur))
    return runs


# ================================================================ device operations

class RegistrationError(Exception):
    """Host memory could not be page-locked for the device."""


class Registrar(Protocol):
    """Page-locks host ranges for DMA (``CudaHostRegistrar``; tests pass fakes)."""

    def register(self, ptr: int, nbytes: int) -> None:
        """Page-lock [ptr, ptr + nbytes); raise ``RegistrationError`` when refused."""

    def unregister(self, ptr: int) -> None:
        """Undo ``register(ptr, ...)``."""


class CudaHostRegistrar:
    """``cudaHostRegister(ptr, n, cudaHostRegisterReadOnly)`` through PyTorch's cudart bindings.

    A refused call leaves its error as the CUDA runtime's last error of the calling thread; it is
    called only from this module's worker threads, which launch no kernels and end with the read."""

    def __init__(self) -> None:
        self._cudart = torch.cuda.cudart()

    def register(self, ptr: int, nbytes: int) -> None:
        err = self._cudart.cudaHostRegister(ptr, nbytes, CUDA_HOST_REGISTER_READ_ONLY)
        if int(err) != 0:
            raise RegistrationError(f"cudaHostRegister(read-only) failed: {self._cudart.cudaGetErrorString(err)}")

    def unregister(self, ptr: int) -> None:
        err = self._cudart.cudaHostUnregister(ptr)
        if int(err) != 0:
            logger.warning("cudaHostUnregister failed: %s", self._cudart.cudaGetErrorString(err))


class _Lane(Protocol):
    """One worker's copy queue."""

    def wait(self, fence: object) -> None: ...
    def copy_all(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None: ...
    def record(self) -> object: ...
    def done(self, event: object) -> bool: ...
    def sync(self, event: object) -> None: ...
    def synchronize(self) -> None: ...
    def staging(self, nbytes: int) -> torch.Tensor: ...
    def close(self) -> None: ...


class _Ops(Protocol):
    """Allocation on the consumer's side, and lanes for the workers."""

    def alloc(self, nbytes: int) -> torch.Tensor: ...
    def fence(self) -> object: ...
    def lane(self) -> _Lane: ...


class _CpuLane:
    """Synchronous copies (a CPU target: tests, or a CPU caller of ``read_tensors``)."""

    def wait(self, fence: object) -> None:
        pass

    def copy_all(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def record(self) -> object:
        return True  # the copies are already done

    def done(self, event: object) -> bool:
        return True

    def sync(self, event: object) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def close(self) -> None:
        pass


class _CpuOps:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def fence(self) -> object:
        return None

    def lane(self) -> _Lane:
        return _CpuLane()


class _CudaLane:
    """A worker's own CUDA stream; its copies are asynchronous, completion is tracked by events."""

    def __init__(self, device: torch.device) -> None:
        torch.cuda.set_device(device)
        self.stream = torch.cuda.Stream(device=device)

    def wait(self, fence: object) -> None:
        if fence is not None:
            self.stream.wait_event(fence)  # type: ignore[arg-type]

    def copy_all(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)

    def record(self) -> object:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def done(self, event: object) -> bool:
        return event is None or event.query()  # type: ignore[attr-defined]

    def sync(self, event: object) -> None:
        if event is None:
            self.stream.synchronize()
        else:
            event.synchronize()  # type: ignore[attr-defined]

    def synchronize(self) -> None:
        self.stream.synchronize()

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def close(self) -> None:
        pass


class _CudaOps:
    """Destinations come from the consumer stream's pool; a fence (event on that stream) recorded after
    each allocation is what a worker's stream waits for before writing (the freed block may still be in
    use by work queued on the consumer stream)."""

    def __init__(self, device: torch.device, consumer: torch.cuda.Stream) -> None:
        self.device, self.consumer = device, consumer

    def alloc(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.stream(self.consumer):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def fence(self) -> object:
        event = torch.cuda.Event()
        event.record(self.consumer)
        return event

    def lane(self) -> _Lane:
        return _CudaLane(self.device)


# ================================================================ the file

class _Mapping:
    """The file memory-mapped read-only, as one uint8 tensor; chunks page-locked on demand."""

    def __init__(self, fd: int, size: int, registrar: Optional[Registrar]) -> None:
        self._mm: Optional[mmap.mmap] = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the given buffer is not writable": it is only read
            self._base: Optional[torch.Tensor] = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._ptr = self._base.data_ptr()
        self._registrar = registrar

    def view(self, start: int, end: int) -> torch.Tensor:
        if self._base is None:
            raise _Stopped
        return self._base[start:end]

    def register(self, start: int, end: int) -> Callable[[], None]:
        """Page-lock the pages of [start, end); returns the release (unregister, drop the pages from
        this mapping). Raises ``RegistrationError``."""
        first = start - start % PAGE
        if self._registrar is not None:
            self._registrar.register(self._ptr + first, end - first)

        drop = drop_pages()

        def release() -> None:
            try:
                if self._registrar is not None:
                    self._registrar.unregister(self._ptr + first)
            finally:
                if drop:
                    self._drop(first, end - first)
        return release

    def _drop(self, start: int, length: int) -> None:
        mm = self._mm
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, length)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Unmap; only once nothing reads from a view any more."""
        self._base = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None


# ================================================================ the reader

class _Stopped(Exception):
    """The read was stopped (closed early, or another worker failed)."""


_BLOCKED = object()


@dataclass
class ReadStats:
    """What a ``read_tensors`` call did (filled in while it runs; for tests and benchmarks)."""
    mode: str = ""
    threads: int = 0
    chunk_bytes: int = 0
    chunks: int = 0
    bytes: int = 0
    registered_chunks: int = 0
    read_spans: int = 0
    fallback: Optional[str] = None
    peak_in_flight: int = 0


@dataclass
class _Batch:
    parts: list[tuple[int, int]]
    release: Optional[Callable[[], None]]
    event: object = None


@dataclass
class _Item:
    name: str
    info: TensorInfo
    dtype: torch.dtype
    nbytes: int
    offset: int


class _Reader:
    """The shared state of one read: chunk dispatch, in-order allocation under the budget, completion
    and the hand-over to the consumer. The mutable state is guarded by ``_cv``."""

    def __init__(self, *, path: Path, file_size: int, items: list[_Item], chunks: list[Chunk], ops: _Ops,
                 threads: int, budget: int, staging_bytes: int, mode: str, registrar: Optional[Registrar],
                 stats: ReadStats) -> None:
        self.path, self.file_size, self.items, self.chunks, self.ops = path, file_size, items, chunks, ops
        self.threads, self.budget, self.staging_bytes = threads, budget, staging_bytes
        # mode: "register" | "hybrid" (the first ``register_workers`` workers register, the others pread) | "mmap" | "pread"
        self.mode, self.registrar, self.stats = mode, registrar, stats
        self.register_workers = register_workers_setting() if mode == "hybrid" else threads
        self._cv = threading.Condition()
        self._read_lock = threading.Lock()
        self._fd = -1
        self._mapping: Optional[_Mapping] = None
        self._register_ok = True
        self._next_chunk = 0
        self._next_alloc = 0
        self._raw: list[Optional[torch.Tensor]] = []
        self._left: list[int] = []
        self._done: deque[int] = deque()
        self._in_flight = 0
        self._fence: object = None
        self._error: Optional[BaseException] = None
        self._stop = False
        self._alive = 0
        self._workers: list[threading.Thread] = []
        self._allocator: Optional[threading.Thread] = None

    # ---------------------------------------------------------------- life cycle (consumer thread)
    def start(self) -> None:
        self._raw = [None] * len(self.items)
        self._left = [item.nbytes for item in self.items]
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        size = os.fstat(self._fd).st_size
        if size != self.file_size:
            raise CheckpointError(
                f"{self.path.name} changed size while it was being loaded.",
                found=f"{size} bytes ({self.path})", expected=f"{self.file_size} bytes, as when its header was read",
                fix="wait until the download or copy of the file has finished, then run again")
        if self.mode in ("register", "hybrid", "mmap"):
            try:
                self._mapping = _Mapping(self._fd, self.file_size,
                                         self.registrar if self.mode in ("register", "hybrid") else None)
            except (OSError, ValueError, RuntimeError) as e:
                self._refuse_registration(f"cannot memory-map the file: {e}")
        n = max(1, min(self.threads, len(self.chunks)))
        self.stats.threads = n
        self._allocator = threading.Thread(target=self._allocate_main, name="zimage-fastread-alloc", daemon=True)
        self._allocator.start()
        for i in range(n):
            worker = threading.Thread(target=self._worker_main, args=(i < self.register_workers,),
                                      name=f"zimage-fastread-{i}", daemon=True)
            with self._cv:
                self._alive += 1
            try:
                worker.start()
            except BaseException:
                with self._cv:
                    self._alive -= 1
                raise
            self._workers.append(worker)

    def next_done(self) -> tuple[int, torch.Tensor]:
        """Wait for the next complete tensor: (index, raw bytes). Raises a worker's error."""
        with self._cv:
            while True:
                if self._error is not None:
                    raise self._error
                if self._done:
                    index = self._done.popleft()
                    raw, self._raw[index] = self._raw[index], None
                    if raw is None:
                        raise RuntimeError(f"fastread: tensor {index} of {self.path.name} completed unallocated")
                    return index, raw
                if self._alive == 0:
                    raise RuntimeError(f"fastread: the workers reading {self.path.name} ended early")
                self._cv.wait()

    def release(self, nbytes: int) -> None:
        """A tensor of ``nbytes`` was handed to the caller: it no longer counts against the budget."""
        with self._cv:
            self._in_flight -= nbytes
            self._cv.notify_all()

    def close(self) -> None:
        """Stop and join the workers (they wait for their copies and release their chunks), then drop
        every tensor and close the mapping and the file."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for worker in self._workers:
            worker.join()
        self._workers.clear()
        if self._allocator is not None:
            self._allocator.join()
            self._allocator = None
        with self._cv:
            self._raw = [None] * len(self._raw)
            self._done.clear()
            self._error = None
        try:
            if self._mapping is not None:
                self._mapping.close()
                self._mapping = None
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # ---------------------------------------------------------------- shared by the workers
    def take_chunk(self) -> Optional[int]:
        with self._cv:
            if self._stop:
                raise _Stopped
            if self._next_chunk >= len(self.chunks):
                return None
            self._next_chunk += 1
            return self._next_chunk - 1

    def allocated_through(self, index: int, block: bool) -> object:
        """Wait until every tensor up to ``index`` (file order) is allocated; returns the fence to wait for
        before writing them, or ``_BLOCKED`` when ``block`` is False and tensor ``index`` is not allocated
        yet (the allocation thread is waiting for the budget, or still allocating)."""
        with self._cv:
            while self._next_alloc <= index:
                if self._stop:
                    raise _Stopped
                if not block:
                    return _BLOCKED
                self._cv.wait()
            return self._fence

    def _allocate_main(self) -> None:
        """The allocation thread: every destination in file order, under the budget. The budget is taken
        under the lock, the allocation and its fence are made outside it, then published together (a
        tensor counts as allocated only once the fence after its allocation exists)."""
        try:
            for k, item in enumerate(self.items):
                n = item.nbytes
                with self._cv:
                    while not self._stop and self._in_flight and self._in_flight + n > self.budget:
                        self._cv.wait()
                    if self._stop:
                        return
                    self._in_flight += n
                    self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
                raw = self.ops.alloc(n)
                fence = self.ops.fence()
                with self._cv:
                    self._raw[k] = raw
                    self._fence = fence
                    self._next_alloc = k + 1
                    self._cv.notify_all()
                del raw
        except BaseException as e:  # handed to the consumer (a CUDA out-of-memory error as itself)
            traceback.clear_frames(e.__traceback__)
            with self._cv:
                if self._error is None:
                    self._error = e
                self._stop = True
                self._cv.notify_all()

    def destination(self, index: int) -> torch.Tensor:
        raw = self._raw[index]
        if raw is None:
            raise _Stopped
        return raw

    def complete(self, parts: list[tuple[int, int]]) -> None:
        with self._cv:
            for index, n in parts:
                self._left[index] -= n
                if self._left[index] == 0:
                    self._done.append(index)
            self._cv.notify_all()

    def use_mapping(self) -> Optional[_Mapping]:
        return self._mapping if self._register_ok else None

    def count(self, registered: int = 0, read: int = 0) -> None:
        with self._cv:
            self.stats.registered_chunks += registered
            self.stats.read_spans += read

    def _refuse_registration(self, reason: str) -> None:
        global _register_refused
        with self._cv:
            if not self._register_ok:
                return
            self._register_ok = False
            self.stats.fallback = reason
        if isinstance(self.registrar, CudaHostRegistrar) and self.mode in ("register", "hybrid"):
            if _register_refused is None:
                logger.info("Z-Image fast loading: %s; reading through pinned buffers instead", reason)
            _register_refused = reason

    def read_into(self, buf: torch.Tensor, start: int, end: int) -> None:
        """Read file bytes [start, end) into ``buf`` (a CPU uint8 tensor)."""
        view = memoryview(buf.numpy())[: end - start]
        got = 0
        while got < end - start:
            if hasattr(os, "preadv"):
                n = os.preadv(self._fd, [view[got:]], start + got)
            else:  # no positional read (Windows): one shared file position
                with self._read_lock:
                    os.lseek(self._fd, start + got, os.SEEK_SET)
                    with open(self._fd, "rb", buffering=0, closefd=False) as f:
                        n = f.readinto(view[got:]) or 0
            if n <= 0:
                raise CheckpointError(
                    f"{self.path.name} is truncated (an incomplete download or copy): it ends at byte "
                    f"{start + got}.", found=f"end of file at byte {start + got} ({self.path})",
                    expected=f"{self.file_size} bytes",
                    fix="download the file again and check that its size matches the size on the download page")
            got += n

    # ---------------------------------------------------------------- worker threads
    def _worker_main(self, may_map: bool = True) -> None:
        lane: Optional[_Lane] = None
        try:
            lane = self.ops.lane()
            _Worker(self, lane, may_map).run()
        except _Stopped:
            pass
        except BaseException as e:  # handed to the consumer, which raises it
            err: BaseException = e
            if isinstance(e, OSError):
                err = unreadable(self.path, e)
                err.__cause__ = e
            traceback.clear_frames(e.__traceback__)  # the finished frames must not keep tensors alive
            with self._cv:
                if self._error is None:
                    self._error = err
                self._stop = True
                self._cv.notify_all()
        finally:
            try:
                if lane is not None:
                    lane.close()
            finally:
                with self._cv:
                    self._alive -= 1
                    self._cv.notify_all()


class _Worker:
    """One thread's loop: take a chunk, get its bytes (registered mapping, else pread into a staging
    buffer), queue the copies on the lane, publish pieces once their copies completed.

    Progress rule: a worker publishes every copy it queued (``drain(0)``) before it waits for a
    destination to be allocated; the allocation thread allocates in file order under the budget, so the
    oldest unallocated tensor always becomes allocatable."""

    def __init__(self, reader: _Reader, lane: _Lane, may_map: bool = True) -> None:
        self.r, self.lane, self.may_map = reader, lane, may_map
        self.pending: deque[_Batch] = deque()
        self.free_staging: list[torch.Tensor] = []
        self.staging_made = 0
        self.fence_seen: object = None
        self.hold = hold_chunks()

    def run(self) -> None:
        try:
            while (k := self.r.take_chunk()) is not None:
                chunk = self.r.chunks[k]
                if not self._copy_mapped(chunk):
                    self._copy_read(chunk)
            self.drain(0)
        finally:
            try:
                self.lane.synchronize()
            finally:
                releases = [b.release for b in self.pending if b.release is not None]
                self.pending.clear()
                self.free_staging.clear()
                for release in releases:
                    try:
                        release()
                    except Exception:  # noqa: BLE001 - keep releasing the others
                        logger.exception("fastread: releasing a chunk failed")

    def _copy_mapped(self, chunk: Chunk) -> bool:
        mapping = self.r.use_mapping() if self.may_map else None
        if mapping is None:
            return False
        try:
            release = mapping.register(chunk.start, chunk.end)
        except RegistrationError as e:
            self.r._refuse_registration(str(e))
            return False
        self._copy_pieces(chunk.pieces, chunk.start, mapping.view(chunk.start, chunk.end), release)
        self.drain(self.hold - 1)  # at most ``hold`` chunks stay registered
        self.r.count(registered=1)
        return True

    def _copy_read(self, chunk: Chunk) -> None:
        for start, end, pieces in split_runs(chunk.pieces, self.r.staging_bytes):
            buf = self._staging()
            try:
                self.r.read_into(buf, start, end)
            except BaseException:
                self.free_staging.append(buf)
                raise
            self._copy_pieces(pieces, start, buf[: end - start], lambda buf=buf: self.free_staging.append(buf))
            self.r.count(read=1)

    def _staging(self) -> torch.Tensor:
        while not self.free_staging:
            if self.staging_made < STAGING_SLOTS:
                self.staging_made += 1
                return self.lane.staging(self.r.staging_bytes)
            if not self.pending:
                raise RuntimeError("fastread: no staging buffer is free and none is in use")
            self.drain(len(self.pending) - 1)
        return self.free_staging.pop()

    def _copy_pieces(self, pieces: Sequence[Piece], base: int, src: torch.Tensor,
                     release: Optional[Callable[[], None]]) -> None:
        """Queue the copies of ``pieces`` from ``src`` (file bytes from offset ``base``); ``release`` runs
        once they are done (or on failure, after the lane is synchronized)."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        parts: list[tuple[int, int]] = []
        try:
            for p in pieces:
                fence = self.r.allocated_through(p.tensor, block=False)
                if fence is _BLOCKED:
                    self._enqueue(pairs, parts, None)
                    pairs, parts = [], []
                    self.drain(0)
                    fence = self.r.allocated_through(p.tensor, block=True)
                if fence is not None and fence is not self.fence_seen:
                    self.lane.wait(fence)
                    self.fence_seen = fence
                dst = self.r.destination(p.tensor)
                pairs.append((dst[p.dst:p.dst + p.n], src[p.src - base:p.src - base + p.n]))
                parts.append((p.tensor, p.n))
            self._enqueue(pairs, parts, release)
            release = None
        finally:
            if release is not None:  # failed before the batch took it over
                try:
                    self.lane.synchronize()
                finally:
                    release()

    def _enqueue(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], parts: list[tuple[int, int]],
                 release: Optional[Callable[[], None]]) -> None:
        if not pairs and release is None:
            return
        batch = _Batch(parts, release)
        self.pending.append(batch)  # owns ``release`` from here on
        self.lane.copy_all(pairs)
        batch.event = self.lane.record()
        while self.pending and self.lane.done(self.pending[0].event):  # publish what is already done
            self._finish_oldest()

    def drain(self, keep: int) -> None:
        """Wait for the oldest batches until at most ``keep`` are pending; publish their pieces."""
        while len(self.pending) > keep:
            self.lane.sync(self.pending[0].event)
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        batch = self.pending.popleft()
        if batch.release is not None:
            batch.release()
        self.r.complete(batch.parts)


# ================================================================ the entry point

def read_tensors(path: str | Path, names: Iterable[str], device: torch.device | str,
                 dtype_for: Callable[[str, TensorInfo], Optional[torch.dtype]], *,
                 threads: Optional[int] = None, chunk_bytes: Optional[int] = None,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES, staging_bytes: int = STAGING_BYTES,
                 mode: Optional[str] = None, registrar: Optional[Registrar] = None,
                 stats: Optional[ReadStats] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` once for each of ``names`` (no duplicates), in completion order, on
    ``device`` in ``dtype_for(name, info)`` (None: the file's dtype). See the module docstring.

    ``mode``: "register" (memory map + ``registrar``, default ``CudaHostRegistrar``; falls back to
    "pread" chunk by chunk when refused), "pread", or "mmap" (plain copies from the mapping; CPU only).
    Default: "pread"; "register" for CUDA when ``ZIMAGE_FASTREAD=register`` (unless registration was
    refused before in this process). ``threads``/``chunk_bytes`` default to the environment knobs;
    ``stats`` (optional) is filled in."""
    path = Path(path)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("read_tensors: names must not repeat")
    stats = stats if stats is not None else ReadStats()
    mode = mode or _default_mode(device)
    if mode not in ("register", "hybrid", "pread", "mmap") or (mode == "mmap" and device.type != "cpu"):
        raise ValueError(f"read_tensors: mode {mode!r} is not possible for {device}")
    if mode in ("register", "hybrid") and registrar is None:
        if device.type != "cuda":
            raise ValueError("read_tensors: mode 'register' needs a registrar off CUDA")
        registrar = CudaHostRegistrar()
    chunk = chunk_bytes or chunk_bytes_setting()
    chunk = max(PAGE, chunk - chunk % PAGE)

    header = read_header(path)
    for name in names:
        if name not in header.tensors:
            raise missing_tensor(path, name)
    items = sorted((_Item(name, info, DTYPES[info.dtype][1], info.nbytes, info.offset)
                    for name, info in ((n, header.tensors[n]) for n in names)), key=lambda it: it.offset)
    empty = [it for it in items if it.nbytes == 0]
    items = [it for it in items if it.nbytes > 0]
    stats.mode, stats.chunk_bytes = mode, chunk
    stats.bytes = sum(it.nbytes for it in items)

    for it in empty:
        want = dtype_for(it.name, it.info)
        yield it.name, torch.empty(it.info.shape, dtype=want or it.dtype, device=device)
    if not items:
        return
    chunks = plan_chunks([(it.offset, it.nbytes) for it in items], chunk)
    stats.chunks = len(chunks)
    ops: _Ops = (_CudaOps(device, torch.cuda.current_stream(device)) if device.type == "cuda"
                 else _CpuOps(device))
    reader = _Reader(path=path, file_size=header.file_size, items=items, chunks=chunks, ops=ops,
                     threads=threads or load_threads(), budget=budget_bytes, staging_bytes=staging_bytes,
                     mode=mode, registrar=registrar, stats=stats)
    try:
        try:
            reader.start()
        except OSError as e:
            raise unreadable(path, e) from e
        for _ in range(len(items)):
            index, raw = reader.next_done()
            item = items[index]
            tensor = raw.view(item.dtype).view(item.info.shape)
            del raw
            want = dtype_for(item.name, item.info)
            if want is not None and want != tensor.dtype:
                tensor = tensor.to(want)
            reader.release(item.nbytes)
            yield item.name, tensor
            del tensor
    finally:
        reader.close()


def _default_mode(device: torch.device) -> str:
    """pread unless ``ZIMAGE_FASTREAD=register`` (measured on an H200 host, 16 cores, three full-size files
    warm: pread with 12 threads 45.6 GB/s, registration at best 28.9 GB/s; bench/read_sweep.py)."""
    if device.type != "cuda" or _register_refused is not None or not hasattr(mmap, "MADV_DONTNEED"):
        return "pread"
    choice = os.environ.get(ENV_MODE, "").strip().lower()
    return choice if choice in ("register", "hybrid") else "pread"
