"""core/graphs.py: when StepGraphs runs the model, records a graph and replays it (a recording stand-in on the
CPU), and a real CUDA graph of a small DiT against the plain forward on a GPU."""
from __future__ import annotations

import pytest
import torch

from zimage_nodes.core import graphs
from zimage_nodes.core import policy as P


class Recorder:
    """Stands in for a CUDA graph: records which inputs it was built with, replays fn on new inputs."""

    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def __call__(self, fn, x, sigma, cap):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.log.append(("record", tuple(x.shape)))

        def replay(x2, s2, c2):
            self.log.append(("replay", tuple(x2.shape)))
            return fn(x2, s2, c2)
        return replay


def _fn(log):
    def fn(x, s, cap):
        log.append(("run", tuple(x.shape)))
        return x * s.view(-1, 1, 1, 1) + cap.mean()
    return fn


def _inputs(b=1, h=4):
    return torch.randn(b, 16, h, h), torch.rand(b), torch.randn(1, 8, 4)


def test_first_call_runs_second_records_then_replays() -> None:
    log: list = []
    sg = graphs.StepGraphs(_fn(log), record=Recorder(log), device_types=("cpu",))
    x, s, c = _inputs()
    outs = [sg(x, s, c) for _ in range(4)]
    assert [e[0] for e in log] == ["run", "record", "replay", "run", "replay", "run", "replay", "run"]
    assert sg.replays == 3 and sg.error is None
    for o in outs:
        assert torch.equal(o, x * s.view(-1, 1, 1, 1) + c.mean())
    sg.close()
    assert sg.graphs == {}


def test_a_second_signature_runs_plainly_beyond_max_graphs() -> None:
    log: list = []
    sg = graphs.StepGraphs(_fn(log), max_graphs=1, record=Recorder(log), device_types=("cpu",))
    a, b = _inputs(h=4), _inputs(h=6)
    for _ in range(3):
        sg(*a)
        sg(*b)
    recorded = [e for e in log if e[0] == "record"]
    assert recorded == [("record", (1, 16, 4, 4))]  # only the first signature gets a graph
    assert sum(1 for e in log if e == ("run", (1, 16, 6, 6))) == 3


def test_a_failed_recording_turns_graphs_off_and_the_step_still_runs() -> None:
    log: list = []
    sg = graphs.StepGraphs(_fn(log), record=Recorder(log, fail=True), device_types=("cpu",))
    x, s, c = _inputs()
    outs = [sg(x, s, c) for _ in range(3)]
    assert "stream is capturing" in sg.error and sg.replays == 0
    assert [e[0] for e in log] == ["run", "run", "run"]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_off_the_listed_devices_nothing_is_recorded() -> None:
    log: list = []
    sg = graphs.StepGraphs(_fn(log), record=Recorder(log))  # default: CUDA only
    for _ in range(3):
        sg(*_inputs())
    assert [e[0] for e in log] == ["run"] * 3 and sg.replays == 0


def _plan(mode: P.Mode, budget: int, dit_peak: int) -> P.Plan:
    return P.Plan(mode, budget, 0, 0, 0, False, 512, dit_peak, {"dit": dit_peak})


def test_graph_headroom_needs_a_resident_dit_and_room_for_a_second_activation_set() -> None:
    req = P.Request(1024, 1024)
    act = P._dit_act(req)
    assert P.graph_headroom(_plan(P.Mode.MODEL_OFFLOAD, 20 * 2**30, 13 * 2**30), req)
    assert P.graph_headroom(_plan(P.Mode.FULL_GPU, 13 * 2**30 + act, 13 * 2**30), req)
    assert not P.graph_headroom(_plan(P.Mode.FULL_GPU, 13 * 2**30 + act - 1, 13 * 2**30), req)
    for mode in (P.Mode.BLOCK_SWAP, P.Mode.SEQUENTIAL, P.Mode.CPU):
        assert not P.graph_headroom(_plan(mode, 80 * 2**30, 13 * 2**30), req)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_of_a_small_dit_equals_its_forward() -> None:
    from zimage_nodes.core import sampling, schedule
    from zimage_nodes.core.dit import DiTConfig, ZImageDiT
    cfg = DiTConfig(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, ffn_hidden=768, cap_feat_dim=64,
                    axes_dims=(32, 48, 48))
    torch.manual_seed(0)
    dit = ZImageDiT(cfg).eval()
    with torch.no_grad():
        for prm in dit.parameters():  # the pad tokens are torch.empty: give every tensor defined values
            prm.copy_(torch.randn_like(prm) * 0.05)
    dit = dit.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 32, 32, generator=g).cuda()
    cap = torch.randn(1, 20, cfg.cap_feat_dim, generator=g).cuda().bfloat16()
    sigmas = schedule.make_sigmas("turbo", 9)
    with torch.inference_mode():
        ref = sampling.sample(dit, noise, sigmas, cap)
        sg = graphs.StepGraphs(dit)
        got = sampling.sample(sg, noise, sigmas, cap)
    assert sg.error is None and sg.replays == len(sigmas) - 2  # all but the first forward
    assert torch.equal(got, ref)  # the same kernels on the same inputs
    sg.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recording_is_not_disturbed_by_a_thread_polling_device_memory() -> None:
    """The VRAM monitor samples cudaMemGetInfo and the allocator's stats from its own thread while the
    sampler runs; neither the recording nor the monitor may fail because of the other."""
    import threading
    from zimage_nodes.core.vram import MemoryProbe
    probe = MemoryProbe(torch.device("cuda", 0), nvml=None)  # cudaMemGetInfo, not NVML
    w = torch.randn(512, 512, device="cuda")
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                probe.snapshot()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                return

    def fn(x: torch.Tensor, sigma: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        for _ in range(200):  # long enough for the poller to run during the recording
            x = torch.tanh(x @ w) * sigma + cap.mean()
        return x

    x, s, c = torch.randn(64, 512, device="cuda"), torch.ones(1, device="cuda"), torch.ones(1, 4, device="cuda")
    ref = fn(x, s, c)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with torch.inference_mode():
            sg = graphs.StepGraphs(fn)
            outs = [sg(x, s, c) for _ in range(4)]
    finally:
        stop.set()
        poller.join()
    assert not errors, errors
    assert sg.error is None and sg.replays == 3
    assert all(torch.equal(o, ref) for o in outs)
    sg.close()


def test_the_sampler_replays_graphs_only_when_opted_in_and_everything_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_nodes import runtime
    req = P.Request(1024, 1024)
    roomy = _plan(P.Mode.MODEL_OFFLOAD, 40 * 2**30, 13 * 2**30)
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(runtime.GRAPHS_ENV, raising=False)
    assert not runtime.graphs_allowed("auto", cuda, roomy, req, True, 8)  # opt-in
    monkeypatch.setenv(runtime.GRAPHS_ENV, "1")
    assert runtime.graphs_allowed("auto", cuda, roomy, req, True, 8)
    assert not runtime.graphs_allowed("blocks", cuda, roomy, req, True, 8)
    assert not runtime.graphs_allowed("auto", cuda, roomy, req, False, 8)  # compile failed: eager
    assert not runtime.graphs_allowed("auto", torch.device("cpu"), roomy, req, True, 8)
    assert not runtime.graphs_allowed("auto", cuda, roomy, req, True, 2)
    assert not runtime.graphs_allowed("auto", cuda, None, req, True, 8)
    assert not runtime.graphs_allowed("auto", cuda, _plan(P.Mode.BLOCK_SWAP, 40 * 2**30, 13 * 2**30), req, True, 8)
    monkeypatch.setenv(runtime.GRAPHS_ENV, "0")
    assert not runtime.graphs_allowed("auto", cuda, roomy, req, True, 8)
    said: list[str] = []
    monkeypatch.setattr(runtime.bridge, "warn", said.append)
    monkeypatch.setenv(runtime.GRAPHS_ENV, "maybe")
    assert not runtime.graphs_allowed("auto", cuda, roomy, req, True, 8)
    assert len(said) == 1 and "ZIMAGE_CUDA_GRAPHS='maybe'" in said[0] and "set it to 1" in said[0]
