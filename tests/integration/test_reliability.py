"""Reliability (issue 10): interrupts through the real HTTP server, injected out-of-memory errors
(ZIMAGE_TEST_INJECT_OOM), fuzzed node inputs, and two clients sharing the queue. Every run is bounded by a
timeout; nothing here asserts on timings. The soak is tests/integration/test_soak.py."""
from __future__ import annotations

import copy
import json
import threading
import uuid

import numpy as np
import pytest
from PIL import Image

from tests import comfy_env
from tests.comfy_env import REPO
from zimage_nodes import policy_runtime, runtime
from zimage_nodes.core import policy as P

TIMEOUT = 300.0  # per prompt; tiny checkpoints on a 2-core CPU take seconds


def t2i(seed: int = 1, size: int = 256, text: str = "a red fox in snow", steps: int = 3,
        prefix: str = "rel") -> dict:
    prompt = json.loads((REPO / "workflows/api/z_image_turbo_t2i.json").read_text())
    prompt["2"]["inputs"]["text"] = text
    s = prompt["3"]["inputs"]
    s.update(width=size, height=size, seed=seed, steps=steps)
    prompt["4"]["inputs"]["filename_prefix"] = prefix
    return prompt


def pixels(server, entry: dict) -> np.ndarray:
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1, entry
    img = images[0]
    return np.asarray(Image.open(server.base_dir / "output" / img["subfolder"] / img["filename"]))


def status(entry: dict) -> str:
    return entry["status"]["status_str"]


# ---------------------------------------------------------------- OOM fallback (fake plans) and the switch

def _plan(mode: P.Mode) -> P.Plan:
    return P.Plan(mode, 8 * 2 ** 30, 0, 0, 1, False, 512, 2 ** 30)


def test_fallback_steps_block_swap_down_to_sequential_and_reports_both(monkeypatch):
    monkeypatch.setattr(policy_runtime.bridge, "soft_empty_cache", lambda: None)
    monkeypatch.setattr(policy_runtime.bridge, "warn", lambda msg: None)
    tried, notes = [], []

    def attempt(plan):
        tried.append(plan.mode)
        if plan.mode is P.Mode.BLOCK_SWAP:
            raise runtime.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (test)")
        return "done"

    out = policy_runtime.run_with_fallback(P.Policy(), _plan(P.Mode.BLOCK_SWAP), attempt, _plan, notes)
    assert out == "done" and tried == [P.Mode.BLOCK_SWAP, P.Mode.SEQUENTIAL]
    assert "attempt 1" in notes[0] and "ran out of memory" in notes[0] and "attempt 2" in notes[1]
    # the cpu mode has no lower mode: the error goes out as it came
    with pytest.raises(runtime.torch.cuda.OutOfMemoryError):
        policy_runtime.run_with_fallback(P.Policy(), _plan(P.Mode.CPU), lambda p: attempt(_plan(P.Mode.BLOCK_SWAP)),
                                         _plan, [])


def test_injected_oom_fires_once_per_stage_and_only_when_asked(monkeypatch):
    monkeypatch.setattr(runtime, "_OOM_INJECTED", set())
    monkeypatch.delenv("ZIMAGE_TEST_INJECT_OOM", raising=False)
    runtime._maybe_inject_oom("sample")  # off by default
    monkeypatch.setenv("ZIMAGE_TEST_INJECT_OOM", "sample, decode")
    runtime._maybe_inject_oom("load")
    for stage in ("sample", "decode"):
        with pytest.raises(runtime.torch.cuda.OutOfMemoryError, match="injected"):
            runtime._maybe_inject_oom(stage)
        runtime._maybe_inject_oom(stage)  # consumed: a retry succeeds


@pytest.fixture(scope="module")
def oom_server(tmp_path_factory, tiny_models):
    server = comfy_env.ComfyServer(tmp_path_factory.mktemp("oom_server"), models_dir=tiny_models,
                                   env={"ZIMAGE_TEST_INJECT_OOM": "sample,decode"})
    yield server
    server.stop()


@pytest.mark.server
def test_injected_oom_is_named_with_the_fix_and_the_next_prompt_works(oom_server):
    """On this CPU machine the plan is mode cpu, which has no lower mode, so the sampler cannot fall back
    (the fallback itself is the fake-plan test above and test_sampler's GPU stand-in): the prompt ends with
    an error naming the node, the out-of-memory and the fix, and the server runs the next prompts."""
    for stage in ("sample", "decode"):
        entry, messages = oom_server.run(t2i(seed=5), timeout=TIMEOUT)
        assert status(entry) == "error", stage
        err = [m["data"] for m in messages if m["type"] == "execution_error"][0]
        assert err["node_type"] == "ZImageSampler"
        text = err["exception_message"]
        assert "Out of memory in Z-Image Sampler (Turbo)" in text and "Fix:" in text
        assert "injected by ZIMAGE_TEST_INJECT_OOM" in text
    entry, _ = oom_server.run(t2i(seed=5), timeout=TIMEOUT)
    assert status(entry) == "success"


# ---------------------------------------------------------------- interrupts through the server

@pytest.mark.server
def test_interrupt_at_a_sampling_step_then_the_next_prompt_gives_the_same_image(comfy_server):
    prompt = t2i(seed=11, steps=9)
    clean, _ = comfy_server.run(prompt, timeout=TIMEOUT)
    assert status(clean) == "success"
    expected = pixels(comfy_server, clean)
    sent = []

    def on_message(msg):
        d = msg.get("data", {})
        if msg["type"] == "progress" and d.get("node") == "3" and d.get("value", 0) >= 2 and not sent:
            sent.append(comfy_server.post("/interrupt").status_code)

    other = t2i(seed=12, steps=9)  # another seed, so the sampler runs again
    entry, messages = comfy_server.run(other, timeout=TIMEOUT, on_message=on_message)
    assert sent == [200]
    assert any(m["type"] == "execution_interrupted" for m in messages)
    assert status(entry) == "error" and not entry["outputs"].get("4")
    again, _ = comfy_server.run(t2i(seed=11, steps=9, prefix="again"), timeout=TIMEOUT)
    assert status(again) == "success"
    assert np.array_equal(pixels(comfy_server, again), expected)


# ---------------------------------------------------------------- two clients at once

@pytest.mark.server
def test_two_clients_queueing_at_once_each_get_their_own_image(comfy_server):
    seeds = {"a": 21, "b": 22}
    alone = {}
    for name, seed in seeds.items():
        entry, _ = comfy_server.run(t2i(seed=seed, prefix=f"alone_{name}"), timeout=TIMEOUT)
        alone[name] = pixels(comfy_server, entry)
    assert not np.array_equal(alone["a"], alone["b"])
    results, errors = {}, []

    def client(name):
        try:
            me = copy.copy(comfy_server)
            me.client_id = str(uuid.uuid4())
            results[name] = me.run(t2i(seed=seeds[name], prefix=f"two_{name}"), timeout=TIMEOUT)
        except Exception as e:  # reported below
            errors.append((name, repr(e)))

    threads = [threading.Thread(target=client, args=(n,)) for n in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * TIMEOUT)
    assert not errors and set(results) == set(seeds), errors
    for name, (entry, messages) in results.items():
        assert status(entry) == "success"
        assert np.array_equal(pixels(comfy_server, entry), alone[name]), name


# ---------------------------------------------------------------- fuzzed inputs (in-process)

def _graph(**sampler):
    prompt = t2i(**{k: sampler.pop(k) for k in ("text",) if k in sampler})
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}
    prompt["3"]["inputs"].update(sampler)
    return prompt


@pytest.mark.parametrize("inputs", [
    dict(seed=0), dict(seed=2 ** 64 - 1), dict(width=256, height=384, steps=2),
    dict(text=""), dict(text="fox " * 1250), dict(text="a\x00b\x07c\x1b[31m\u202e\ufeff狐狸 лиса ثعلب 🦊\n\t"),
    dict(steps=2, denoise=0.01),
])
def test_fuzzed_valid_inputs_end_in_an_image(comfy, inputs):
    inputs.setdefault("steps", 2)
    result = comfy.run(_graph(**inputs))
    assert result.success, result.error


@pytest.mark.parametrize("inputs, expect", [
    (dict(width=255), "256..2048"), (dict(width=4096), "256..2048"), (dict(steps=0), "steps"), (dict(steps=1), "steps"),
])
def test_fuzzed_inputs_beyond_the_node_limits_end_in_a_clear_message(comfy, inputs, expect):
    result = comfy.run(_graph(**inputs))
    assert not result.success and result.error is not None
    assert "[Z-Image]" in result.error["exception_message"] and expect in result.error["exception_message"]
    assert comfy.run(_graph(steps=2)).success  # the next prompt works


@pytest.mark.parametrize("inputs", [dict(width=8), dict(seed=-1), dict(seed=2 ** 64), dict(denoise=1.5),
                                    dict(steps=101)])
def test_fuzzed_inputs_outside_the_declared_ranges_fail_validation(comfy, inputs):
    valid, err, _, node_errors = comfy.validate(_graph(**inputs))
    assert not valid and "3" in node_errors


@pytest.mark.server
def test_interrupt_during_the_first_text_encode_then_the_same_image(comfy_server, tmp_path):
    """A fresh embedding_cache_dir is a new loader input, so the loader runs again and the text encoder loads
    and encodes; the interrupt is sent when the encode node starts. The tiny encoder may finish before the
    interrupt lands: then the sampler's first step stops (the prompt is interrupted either way)."""
    clean, _ = comfy_server.run(t2i(seed=31, prefix="enc_clean"), timeout=TIMEOUT)
    assert status(clean) == "success"
    expected = pixels(comfy_server, clean)
    prompt = t2i(seed=31, steps=60, text="an unseen prompt for the encoder " + uuid.uuid4().hex)
    prompt["1"]["inputs"]["embedding_cache_dir"] = str(tmp_path / "cache")
    sent = []

    def on_message(msg):
        d = msg.get("data", {})
        if msg["type"] in ("executing", "progress") and d.get("node") == "2" and not sent:
            sent.append(comfy_server.post("/interrupt").status_code)

    entry, messages = comfy_server.run(prompt, timeout=TIMEOUT, on_message=on_message)
    assert sent == [200]
    stopped = [m["data"] for m in messages if m["type"] == "execution_interrupted"]
    assert stopped and stopped[0]["node_id"] in ("2", "3"), messages
    assert status(entry) == "error"
    again = t2i(seed=31, prefix="enc_again")
    again["1"]["inputs"]["embedding_cache_dir"] = str(tmp_path / "cache")
    entry, _ = comfy_server.run(again, timeout=TIMEOUT)
    assert status(entry) == "success"
    assert np.array_equal(pixels(comfy_server, entry), expected)


# Interrupting during VAE decode is not tested: the tiny VAE decodes 256 px in milliseconds with no progress
# message to aim at, so the interrupt would land before or after it (the sampler and upscaler cases cover
# the check points we own; ComfyUI's own check runs between nodes).


def _upscale_prompt(seed: int, prefix: str) -> dict:
    prompt = t2i(seed=41, prefix=prefix)
    prompt["7"] = {"class_type": "ZImageTiledUpscale", "inputs": dict(
        model=["1", 0], image=["3", 1], positive=["2", 0], scale_by=1.5, width=0, height=0, tile_size=256,
        overlap=64, denoise=0.3, steps=9, seed=seed, blend="feather")}
    prompt["4"]["inputs"]["images"] = ["7", 0]
    return prompt


@pytest.mark.server
def test_interrupt_between_upscale_tiles_then_the_same_image(comfy_server):
    """256 -> 384 in 256 px tiles with 64 px overlap is 2x2 = 4 tiles; the interrupt is sent after tile 1."""
    clean, _ = comfy_server.run(_upscale_prompt(51, "up_clean"), timeout=TIMEOUT)
    assert status(clean) == "success"
    expected = pixels(comfy_server, clean)
    assert expected.shape[:2] == (384, 384)
    totals, sent = [], []

    def on_message(msg):
        d = msg.get("data", {})
        if msg["type"] == "progress" and d.get("node") == "7":
            totals.append(d["max"])
            if d["value"] >= 1 and not sent:
                sent.append(comfy_server.post("/interrupt").status_code)

    entry, messages = comfy_server.run(_upscale_prompt(52, "up_cut"), timeout=TIMEOUT, on_message=on_message)
    assert sent == [200] and totals[0] == 4 * 8  # 4 tiles of 8 DiT forwards
    stopped = [m["data"] for m in messages if m["type"] == "execution_interrupted"]
    assert stopped and stopped[0]["node_id"] == "7"
    again, _ = comfy_server.run(_upscale_prompt(51, "up_again"), timeout=TIMEOUT)
    assert status(again) == "success"
    assert np.array_equal(pixels(comfy_server, again), expected)


# ---------------------------------------------------------------- damaged checkpoints not covered by test_loader_node

@pytest.fixture
def dit_folder(comfy, tmp_path):
    """A fresh folder in ComfyUI's diffusion_models list (as extra_model_paths.yaml adds one)."""
    import folder_paths
    path = tmp_path / "diffusion_models"
    path.mkdir()
    folder_paths.add_model_folder_path("diffusion_models", str(path))
    folder_paths.filename_list_cache.pop("diffusion_models", None)
    yield path
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(path))
    folder_paths.filename_list_cache.pop("diffusion_models", None)


def _with_dit(name: str, **sampler) -> dict:
    prompt = _graph(steps=2, **sampler)
    prompt["1"]["inputs"]["dit_name"] = name
    return prompt


def _damage_cases(good: bytes) -> tuple[dict[str, bytes], dict, int]:
    import struct
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    return {
        "zero_length.safetensors": b"",
        "seven_bytes.safetensors": good[:7],
        "huge_header_length.safetensors": struct.pack("<Q", 2 ** 60) + good[8:],
        "header_length_past_end.safetensors": struct.pack("<Q", len(good)) + good[8:],
        "header_claims_more.safetensors": good[:8 + n] + good[8 + n:8 + n + 16],
    }, header, n


@pytest.mark.parametrize("case", ["zero_length", "seven_bytes", "huge_header_length", "header_length_past_end",
                                  "header_claims_more"])
def test_damaged_dit_files_end_in_a_checkpoint_error(comfy, dit_folder, tiny_models, case):
    good = (tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors").read_bytes()
    cases, _, _ = _damage_cases(good)
    name = f"{case}.safetensors"
    (dit_folder / name).write_bytes(cases[name])
    result = comfy.run(_with_dit(name))
    assert not result.success and result.error is not None
    assert result.error["node_id"] == "1"
    assert result.error["exception_type"].endswith("CheckpointError"), result.error
    msg = result.error["exception_message"]
    assert msg.startswith("[Z-Image] ") and name in msg and "Fix:" in msg
    assert comfy.run(_graph(steps=2, seed=7)).success


def test_nan_bytes_inside_the_dit_data_end_in_the_samplers_nan_message(comfy, dit_folder, tiny_models):
    """The header is intact, so the file loads; the largest tensor's bytes are all 0xFF (NaN in bf16/fp32), so
    the DiT's output is NaN and the sampler stops with its message instead of decoding a black image."""
    good = bytearray((tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors").read_bytes())
    _, header, n = _damage_cases(bytes(good))
    key = max((k for k in header if k != "__metadata__"),
              key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    a, b = header[key]["data_offsets"]
    good[8 + n + a:8 + n + b] = b"\xff" * (b - a)
    (dit_folder / "nan_data.safetensors").write_bytes(bytes(good))
    result = comfy.run(_with_dit("nan_data.safetensors"))
    assert not result.success and result.error is not None, key
    assert result.error["node_id"] == "3"
    assert "[Z-Image]" in result.error["exception_message"] and "NaN" in result.error["exception_message"]
    assert comfy.run(_graph(steps=2, seed=8)).success
