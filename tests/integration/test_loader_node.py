"""ZImageLoader and ZImageTextEncode in the real ComfyUI executor (in-process, --cpu): stage progress,
ComfyUI's model management, caching, and every kind of bad input a user can give the loader.

Extra files live in per-test folders added to ComfyUI's model folder lists (``extra_models``), so the
shared models/ folder and every other test's combo lists stay as they are.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import pickle
import shutil
import sys
import uuid
import weakref
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.comfy_env import PACK_DIR_NAME, REPO
from zimage_nodes.testing import weights

DIFFUSERS = Path("diffusers") / "Z-Image-Turbo"
LOADER_INPUTS = {"dit_name": "z_image_turbo_bf16.safetensors", "text_encoder_name": "qwen_3_4b.safetensors",
                 "vae_name": "ae.safetensors", "diffusers_folder": "none", "dit_device": "auto",
                 "dit_dtype": "auto", "te_device": "auto", "te_dtype": "auto", "vae_device": "auto",
                 "vae_dtype": "auto", "embedding_cache_dir": ""}


# ---------------------------------------------------------------- prompts

def loader_prompt(**inputs) -> dict:
    """The loader alone, its report shown by core's PreviewAny (an output node)."""
    return {"1": {"class_type": "ZImageLoader", "inputs": dict(LOADER_INPUTS, **inputs)},
            "9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def encode_prompt(text: str = "a red fox in snow", **inputs) -> dict:
    p = loader_prompt(**inputs)
    p["2"] = {"class_type": "ZImageTextEncode", "inputs": {"model": ["1", 0], "text": text}}
    p["9"]["inputs"]["source"] = ["2", 1]
    return p


def t2i_prompt(seed: int = 1, **inputs) -> dict:
    p = json.loads((REPO / "workflows/api/z_image_turbo_t2i.json").read_text())
    p["1"]["inputs"].update(inputs)
    p["3"]["inputs"].update(width=256, height=256, seed=seed, steps=2)  # one DiT forward
    p["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}
    return p


def unique() -> str:
    return uuid.uuid4().hex[:8]


def executed(result) -> set[str]:
    return {d["node"] for d in result.events("executed")}


def cached(result) -> set[str]:
    return {n for d in result.events("execution_cached") for n in d["nodes"]}


def report(result, node: str) -> str:
    return result.outputs[node]["text"][0]


# ---------------------------------------------------------------- the pack as ComfyUI loaded it

def pack(module: str):
    """A module of the pack as ComfyUI imported it (custom nodes get their own module names)."""
    suffix = f"{PACK_DIR_NAME}.zimage_nodes.{module}"
    for name, mod in list(sys.modules.items()):
        if name.endswith(suffix):
            return mod
    raise LookupError(suffix)


@pytest.fixture
def loaded_models(comfy, monkeypatch) -> list:
    """Every ZImageModel the loader node returns during the test."""
    runtime = pack("runtime")
    models: list = []
    real = runtime.load_model

    def capture(*a, **k):
        model, text = real(*a, **k)
        models.append(model)
        return model, text
    monkeypatch.setattr(runtime, "load_model", capture)
    return models


class FileReads:
    """Records every file the pack opens, as (what, path): "header" (st_io.read_header), "tensors"
    (st_io's safe_open), "cache" (an embedding-cache entry) and "tokenizer"."""

    def __init__(self, monkeypatch) -> None:
        self.opened: list[tuple[str, str]] = []
        st_io, te = pack("core.st_io"), pack("core.text_encoder")

        def spy(what, real):
            def wrapped(path, *a, **k):
                self.opened.append((what, str(path)))
                return real(path, *a, **k)
            return wrapped
        monkeypatch.setattr(st_io, "open", spy("header", open), raising=False)
        monkeypatch.setattr(st_io, "safe_open", spy("tensors", st_io.safe_open))
        monkeypatch.setattr(te, "safe_open", spy("cache", te.safe_open))
        monkeypatch.setattr(te, "load_tokenizer", spy("tokenizer", te.load_tokenizer))

    @property
    def paths(self) -> list[str]:
        return [p for _, p in self.opened]

    def of(self, what: str) -> list[str]:
        return [p for w, p in self.opened if w == what]


def loaded_patchers() -> list:
    import comfy.model_management as mm
    return [lm.model for lm in mm.current_loaded_models]


def is_registered(patcher) -> bool:
    return any(p is patcher for p in loaded_patchers())


# ---------------------------------------------------------------- extra model folders

@contextlib.contextmanager
def extra_folder(folder_name: str, path: Path) -> Iterator[Path]:
    """``path`` added to ComfyUI's list for ``folder_name`` (as extra_model_paths.yaml would), removed after;
    ComfyUI's cached file list is invalidated both times."""
    import folder_paths
    path.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path(folder_name, str(path))
    folder_paths.filename_list_cache.pop(folder_name, None)
    try:
        yield path
    finally:
        folder_paths.folder_names_and_paths[folder_name][0].remove(str(path))
        folder_paths.filename_list_cache.pop(folder_name, None)


@pytest.fixture
def extra_models(comfy, tmp_path):
    """extra_models("diffusion_models") -> a fresh folder in that list for this test."""
    stack = contextlib.ExitStack()

    def add(folder_name: str) -> Path:
        return stack.enter_context(extra_folder(folder_name, tmp_path / "extra" / folder_name))
    with stack:
        yield add


# ---------------------------------------------------------------- checks shared by the bad-input tests

def assert_user_error(result, *words: str, kind: str = "CheckpointError") -> str:
    """The run failed in the loader with a pack error that names what was found, what was expected and the fix."""
    assert not result.success
    err = result.error
    assert err is not None, result.messages
    assert err["node_id"] == "1"
    assert err["exception_type"].endswith(kind), err["exception_type"]
    msg = err["exception_message"]
    assert msg.startswith("[Z-Image] ")
    for part in ("\nFound: ", "\nExpected: ", "\nFix: "):
        assert part in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in:\n{msg}"
    return msg


def assert_recovers(comfy) -> None:
    """The next valid prompt loads (for real: the failed prompt dropped the loader's cached output) and succeeds,
    and ComfyUI holds no half-loaded model."""
    import comfy.model_management as mm
    r = comfy.run(loader_prompt())
    assert r.success, r.error
    assert "1" in executed(r)
    assert all(lm.model is not None for lm in mm.current_loaded_models)  # no entry of a dropped model


# ================================================================ 2. stage progress

def test_loader_reports_progress_per_tensor(comfy, loaded_models) -> None:
    r = comfy.run(encode_prompt(text=f"progress {unique()}", vae_dtype="fp32"))
    assert r.success, r.error
    model = loaded_models[-1]
    n = len(model.plan.dit.shapes) + len(model.plan.vae.shapes)
    loader_bar = [d for d in r.events("progress") if d["node"] == "1"]
    values = [d["value"] for d in loader_bar]
    assert {d["max"] for d in loader_bar} == {n}
    assert values == sorted(values) and values[-1] == n
    assert 10 <= len(values) <= 110  # about one update per 1 % of the tensors, not one per tensor
    te_bar = [d for d in r.events("progress") if d["node"] == "2"]
    assert te_bar and te_bar[-1]["value"] == te_bar[-1]["max"] == model.te.n_tensors
    assert "text encoder loaded" in report(r, "9")


@pytest.mark.parametrize("how", ["interrupt while the VAE streams", "out of memory while the DiT streams"])
def test_a_load_that_stops_halfway_releases_what_it_loaded(comfy, monkeypatch, how) -> None:
    """Cancelled while the VAE streams (the DiT is loaded and registered), or out of memory halfway through the
    DiT: the run fails, ComfyUI lists no model of it, and the DiT's memory is released at once, not at the next
    garbage collection (ComfyUI keeps a failed node's traceback, and with it the loader's frames, in a reference
    cycle; a retry after an OOM would otherwise find the memory still taken)."""
    import comfy.model_management as mm
    loader_mod = pack("core.loader")
    modules: list[weakref.ref] = []
    real_set, real_stream = loader_mod.set_module_tensor, loader_mod.stream_tensors

    def set_module_tensor(module, name, value):
        if not modules:
            modules.append(weakref.ref(module))
        return real_set(module, name, value)
    monkeypatch.setattr(loader_mod, "set_module_tensor", set_module_tensor)

    def on_progress(node, value, total):
        if how.startswith("interrupt") and node == "1" and value > len(weights.dit_tensors(weights.TINY.dit)):
            mm.interrupt_current_processing(True)

    def stream_then_fail(*a, **k):
        for i, item in enumerate(real_stream(*a, **k)):
            if i == 40:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (simulated)")
            yield item
    if how.startswith("out of memory"):
        monkeypatch.setattr(loader_mod, "stream_tensors", stream_then_fail)

    gc.disable()
    try:
        r = comfy.run(loader_prompt(vae_dtype="bf16", dit_dtype="bf16"), on_progress=on_progress)
        assert not r.success
        if how.startswith("interrupt"):
            assert r.interrupted
        else:
            assert r.error["exception_type"].endswith("OutOfMemoryError")
        assert modules and modules[0]() is None, "the stopped load's DiT is still alive"
    finally:
        gc.enable()
    assert all(lm.model is not None for lm in mm.current_loaded_models)  # no entry left for a dropped model
    monkeypatch.undo()
    assert_recovers(comfy)


# ================================================================ 3. ComfyUI model management

def test_components_are_handed_to_comfyui_model_management(comfy, loaded_models, monkeypatch) -> None:
    import comfy.model_management as mm
    r = comfy.run(loader_prompt(vae_dtype="fp32", dit_dtype="fp32"))
    assert r.success, r.error
    m = loaded_models[-1]
    # registered as soon as the loader streamed them, as resident (nothing left to load, nothing copied)
    for patcher in (m.dit_patcher, m.vae_patcher):
        lm = next(x for x in mm.current_loaded_models if x.model is patcher)
        assert lm.model_loaded_memory() == lm.model_memory() > 0
        assert lm.model_offloaded_memory() == 0
    assert m.dit_patcher.model.inner is m.dit and m.vae_patcher.model.inner is m.vae.model
    assert m.te_patcher is None  # the text encoder loads on first use

    prompt = t2i_prompt(seed=5, vae_dtype="fp32", dit_dtype="fp32")
    r = comfy.run(prompt)
    assert r.success, r.error
    assert "1" in cached(r)
    assert all(is_registered(p) for p in (m.dit_patcher, m.vae_patcher, m.te_patcher))
    dit_storage = m.dit.x_embedder.weight.data_ptr()

    mm.unload_all_models()
    assert not any(is_registered(p) for p in (m.dit_patcher, m.vae_patcher, m.te_patcher))
    reads = FileReads(monkeypatch)
    prompt["3"]["inputs"]["seed"] = 6
    r = comfy.run(prompt)
    assert r.success, r.error
    assert {"1", "2"} <= cached(r)
    assert reads.paths == []  # the model came back from memory
    assert is_registered(m.dit_patcher) and is_registered(m.vae_patcher)
    assert m.dit.x_embedder.weight.data_ptr() == dit_storage
    assert all(not p.is_meta and p.device.type == "cpu" for p in m.dit.parameters())

    # a new prompt text brings the text encoder back into ComfyUI's list, from memory too
    te_storage = m.te.module.model.embed_tokens.weight.data_ptr()
    r = comfy.run(encode_prompt(text=f"after unloading {unique()}", vae_dtype="fp32", dit_dtype="fp32"))
    assert r.success, r.error
    assert "1" in cached(r) and report(r, "9").endswith("tokens, encoded")
    assert is_registered(m.te_patcher) and m.te.module.model.embed_tokens.weight.data_ptr() == te_storage
    assert reads.of("tensors") == []


def test_comfyui_can_evict_our_components_to_make_room_and_we_get_them_back(comfy, monkeypatch) -> None:
    """On a (simulated) 3 MB card: two registered components of ours (1 MB each) and then another model that
    needs 2 MB. ComfyUI offloads ours to make room; load_on_device brings one back whole (force_full_load,
    so plain torch modules are never left half on the card)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    bridge = pack("comfy_bridge")
    card, budget = torch.device("cpu", 0), 3 * 2 ** 20

    def get_free_memory(dev=None, torch_free_too=False):
        used = sum(lm.model_loaded_memory() for lm in mm.current_loaded_models if lm.device == card)
        free = budget - used if dev == card else 2 ** 40
        return (free, free) if torch_free_too else free
    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: 0)
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 0)

    def component() -> torch.nn.Module:
        return torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(16)]).to(card)  # 1 MB

    ours = [bridge.make_patcher(component(), card, card) for _ in range(2)]
    for p in ours:
        bridge.register_loaded(p)
    assert all(is_registered(p) for p in ours) and get_free_memory(card) < 2 * 2 ** 20
    other_module = torch.nn.Sequential(torch.nn.Linear(1024, 512))
    other = comfy.model_patcher.ModelPatcher(other_module, load_device=card, offload_device=torch.device("cpu"))
    try:
        mm.load_models_gpu([other])
        assert is_registered(other)
        evicted = [p for p in ours if not is_registered(p)]
        assert evicted, "ComfyUI did not offload our components to make room"
        assert all(p.current_loaded_device() == p.offload_device for p in evicted)  # moved off the card

        bridge.load_on_device([evicted[0]])
        lm = next(x for x in mm.current_loaded_models if x.model is evicted[0])
        assert lm.model_loaded_memory() == lm.model_memory() and not evicted[0].model.model_lowvram
        assert evicted[0].current_loaded_device() == card  # (torch shows cpu:0 tensors as cpu: bookkeeping only)

        # once loaded by ComfyUI, a component can also be offloaded partly (module by module) ...
        assert lm.model_unload(memory_to_free=300_000) is False
        assert evicted[0].model.model_lowvram and 0 < lm.model_loaded_memory() < lm.model_memory()
        # ... and load_on_device makes it whole again before we run it
        bridge.load_on_device([evicted[0]])
        assert lm.model_loaded_memory() == lm.model_memory() and not evicted[0].model.model_lowvram
    finally:
        bridge.forget(ours + [other])


def test_reloading_with_other_settings_releases_the_previous_model(comfy, loaded_models) -> None:
    """Changing a loader input makes ComfyUI drop the old ZIMAGE_MODEL: its modules are freed at once and
    ComfyUI's list holds only the new ones."""
    r = comfy.run(encode_prompt(text=unique(), te_dtype="fp32"))
    assert r.success, r.error
    old = loaded_models[-1]
    refs = [weakref.ref(x) for x in (old.dit, old.vae.model, old.te.module, old.dit_patcher, old.te_patcher)]
    del old
    loaded_models.clear()
    gc.disable()
    try:
        r = comfy.run(encode_prompt(text=unique(), te_dtype="bf16"))
        assert r.success, r.error
        assert [x() for x in refs] == [None] * len(refs)
    finally:
        gc.enable()
    new = loaded_models[-1]
    names = sorted(type(p.model.inner).__name__ for p in loaded_patchers())
    assert names == ["AutoencoderKL", "ZImageDiT", "ZImageTextEncoder"]
    assert all(is_registered(p) for p in (new.dit_patcher, new.vae_patcher, new.te_patcher))


# ================================================================ 4. caching

def test_changing_only_the_seed_reads_no_file(comfy, monkeypatch) -> None:
    prompt = t2i_prompt(seed=11, vae_dtype="bf16")
    r = comfy.run(prompt)
    assert r.success, r.error
    reads = FileReads(monkeypatch)
    prompt["3"]["inputs"]["seed"] = 12
    r = comfy.run(prompt)
    assert r.success, r.error
    assert {"1", "2"} <= cached(r)
    assert "3" in executed(r)
    assert reads.paths == []


def test_same_prompt_in_a_second_encode_node_hits_the_embedding_cache(comfy, loaded_models, tmp_path) -> None:
    """Two ZImageTextEncode nodes with the same text (the second fed by a String node, so ComfyUI's own cache
    does not merge them): the second takes the embedding from the model's EmbeddingCache."""
    text = f"a lighthouse at dusk {unique()}"
    p = encode_prompt(text=text, embedding_cache_dir=str(tmp_path))  # a new loader (a unique input)
    p["6"] = {"class_type": "PrimitiveString", "inputs": {"value": text}}
    p["5"] = {"class_type": "ZImageTextEncode", "inputs": {"model": ["1", 0], "text": ["6", 0]}}
    p["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}
    r = comfy.run(p)
    assert r.success, r.error
    first, second = sorted([report(r, "9"), report(r, "8")], key=lambda s: "hit" in s)
    assert "encoded" in first and "embedding cache hit" in second
    assert loaded_models[-1].cache.stats["hits"] == 1


def test_embedding_cache_dir_keeps_embeddings_across_loader_runs(comfy, loaded_models, tmp_path,
                                                                 monkeypatch) -> None:
    """embedding_cache_dir: the embedding is written there; a new loader (as after a restart) with the same
    folder answers the prompt from disk without loading the text encoder."""
    cache_dir = tmp_path / "embeddings"
    text = f"an old stone bridge {unique()}"
    r = comfy.run(encode_prompt(text=text, embedding_cache_dir=str(cache_dir)))
    assert r.success, r.error
    files = list(cache_dir.glob("*.safetensors"))
    assert len(files) == 1
    assert f"Embedding cache on disk: {cache_dir}" in report(r, "1")

    reads = FileReads(monkeypatch)
    r = comfy.run(encode_prompt(text=text, embedding_cache_dir=str(cache_dir), vae_dtype="fp32"))
    assert r.success, r.error
    assert "1" in executed(r)  # a new model (the loader re-ran)
    assert "embedding cache hit" in report(r, "9")
    model = loaded_models[-1]
    assert model.te.module is None and model.te_patcher is None
    te_file = str(model.plan.text_encoder.headers[0].path)
    assert te_file in reads.of("header") and te_file not in reads.of("tensors")  # planned, never streamed
    assert [Path(p).parent for p in reads.of("cache")] == [cache_dir]


def test_embedding_cache_dir_that_cannot_be_written(comfy, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = comfy.run(loader_prompt(embedding_cache_dir=str(blocker / "cache")))
    assert_user_error(r, str(blocker / "cache"), "embedding_cache_dir", kind="InputError")
    assert_recovers(comfy)


# ================================================================ 5. bad inputs

FOREIGN_DIT = {
    "sdxl_unet.safetensors": ({"input_blocks.0.0.weight": (32, 4, 3, 3), "label_emb.0.0.weight": (64, 2816),
                               "time_embed.0.weight": (64, 32), "out.2.weight": (4, 32, 3, 3)}, "an SDXL UNet"),
    "flux1-dev.safetensors": ({"double_blocks.0.img_attn.qkv.weight": (96, 32),
                               "single_blocks.0.linear1.weight": (64, 32), "img_in.weight": (32, 64)}, "a Flux DiT"),
    "lumina_2.safetensors": ({"model.diffusion_model.x_embedder.weight": (64, 64),
                              "model.diffusion_model.cap_embedder.1.weight": (64, 32),
                              "model.diffusion_model.t_embedder.mlp.2.weight": (64, 256),
                              "model.diffusion_model.layers.0.attention.qkv.weight": (192, 64),
                              "model.diffusion_model.layers.0.adaLN_modulation.1.weight": (256, 64)},
                             "a Lumina Image 2.0 DiT"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_DIT))
def test_another_models_file_in_the_dit_slot(comfy, extra_models, name) -> None:
    shapes, what = FOREIGN_DIT[name]
    weights.write_sparse(extra_models("diffusion_models") / name, shapes)
    r = comfy.run(loader_prompt(dit_name=name))
    msg = assert_user_error(r, name, what, "`dit_name`", "Z-Image DiT", "pick")
    assert "Expected: the Z-Image DiT (diffusion_models/z_image_turbo_bf16.safetensors)" in msg
    assert_recovers(comfy)


def test_the_vae_in_the_dit_slot_says_which_input_it_belongs_to(comfy, extra_models, tiny_models) -> None:
    shutil.copyfile(tiny_models / "vae" / "ae.safetensors", extra_models("diffusion_models") / "ae_copy.safetensors")
    r = comfy.run(loader_prompt(dit_name="ae_copy.safetensors"))
    msg = assert_user_error(r, "ae_copy.safetensors", "a Flux VAE", "Fix: pick it in the `vae_name` input instead")
    assert "decoder.conv_in" in msg
    assert_recovers(comfy)


def test_wrong_files_in_the_text_encoder_and_vae_slots(comfy, extra_models) -> None:
    weights.write_sparse(extra_models("text_encoders") / "t5xxl.safetensors",
               {"encoder.block.0.layer.0.SelfAttention.q.weight": (64, 64), "shared.weight": (32, 64)})
    r = comfy.run(loader_prompt(text_encoder_name="t5xxl.safetensors"))
    assert_user_error(r, "t5xxl.safetensors", "T5", "`text_encoder_name`", "Qwen3-4B")
    weights.write_sparse(extra_models("vae") / "sdxl_vae.safetensors",
               {"decoder.conv_in.weight": (64, 4, 3, 3), "decoder.conv_out.weight": (3, 64, 3, 3),
                "encoder.conv_in.weight": (64, 3, 3, 3)})
    r = comfy.run(loader_prompt(vae_name="sdxl_vae.safetensors"))
    assert_user_error(r, "sdxl_vae.safetensors", "4 latent channels", "`vae_name`", "Flux VAE")
    assert_recovers(comfy)


def test_truncated_file(comfy, extra_models, tiny_models) -> None:
    good = (tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors").read_bytes()
    (extra_models("diffusion_models") / "z_image_partial.safetensors").write_bytes(good[:len(good) * 2 // 3])
    r = comfy.run(loader_prompt(dit_name="z_image_partial.safetensors"))
    assert_user_error(r, "z_image_partial.safetensors", "truncated", f"Expected: {len(good)} bytes",
                      "download the file again")
    assert_recovers(comfy)


def test_corrupt_header(comfy, extra_models, tiny_models) -> None:
    data = bytearray((tiny_models / "vae" / "ae.safetensors").read_bytes())
    for i in (12, 13, 40, 41):  # inside the JSON header
        data[i] ^= 0xFF
    (extra_models("vae") / "ae_flipped.safetensors").write_bytes(bytes(data))
    r = comfy.run(loader_prompt(vae_name="ae_flipped.safetensors"))
    assert_user_error(r, "ae_flipped.safetensors", "not a valid safetensors file", "download the file again")
    assert_recovers(comfy)


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load and every pickle entry point raise: a test passes only if nothing is unpickled."""
    def banned(*_a, **_k):
        raise AssertionError("something tried to unpickle a file")

    class BannedUnpickler:
        def __init__(self, *_a, **_k):
            banned()
    for obj, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(obj, name, banned)
    monkeypatch.setattr(pickle, "Unpickler", BannedUnpickler)


@pytest.mark.parametrize("name, how", [("z_image_turbo.ckpt", "extension .ckpt"), ("z_image_turbo.pt", "extension .pt"),
                                       ("pytorch_model.bin", "extension .bin"),
                                       ("renamed_pickle.safetensors", "zip archive")])
def test_pickle_files_are_refused_unopened(comfy, extra_models, no_unpickling, name, how) -> None:
    folder = extra_models("diffusion_models")
    torch.save({"x_embedder.weight": torch.zeros(2, 2)}, folder / name)  # saving pickles; loading is banned
    import folder_paths
    assert name in folder_paths.get_filename_list("diffusion_models")  # ComfyUI lists them
    r = comfy.run(loader_prompt(dit_name=name))
    assert_user_error(r, name, "pickle", how, "never unpickles", "Expected: a .safetensors file")
    assert_recovers(comfy)


def _diffusers_copy(tiny_models: Path, dst: Path, tokenizer: bool = True) -> Path:
    """A diffusers folder whose weight sub-folders link to the generated ones."""
    src = tiny_models / DIFFUSERS
    dst.mkdir(parents=True)
    shutil.copyfile(src / "model_index.json", dst / "model_index.json")
    for sub in ("transformer", "text_encoder", "vae", "scheduler"):
        (dst / sub).symlink_to(src / sub, target_is_directory=True)
    if tokenizer:
        shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return dst


def test_diffusers_folder_loads_and_generates(comfy) -> None:
    r = comfy.run(t2i_prompt(seed=3, diffusers_folder="Z-Image-Turbo"))
    assert r.success, r.error
    rep = report(r, "1")
    assert "DiT: transformer/ (3 files) (diffusers)" in rep and "Tokenizer: the folder's tokenizer/" in rep


def test_diffusers_folder_without_tokenizer_uses_comfyuis_with_a_note(comfy, extra_models, tiny_models) -> None:
    name = f"ZNoTok{unique()}"
    _diffusers_copy(tiny_models, extra_models("diffusers") / name, tokenizer=False)
    r = comfy.run(encode_prompt(diffusers_folder=name))
    assert r.success, r.error
    rep = report(r, "1")
    assert "has no tokenizer/; using ComfyUI's Qwen tokenizer files" in rep
    assert "Tokenizer: ComfyUI's Qwen tokenizer files" in rep


def test_incomplete_tokenizer_folder_is_a_clear_error(comfy, extra_models, tiny_models) -> None:
    name = f"ZBadTok{unique()}"
    folder = _diffusers_copy(tiny_models, extra_models("diffusers") / name)
    (folder / "tokenizer" / "tokenizer_config.json").unlink()
    (folder / "tokenizer" / "tokenizer.json").unlink()
    r = comfy.run(loader_prompt(diffusers_folder=name))
    assert_user_error(r, str(folder / "tokenizer"), "merges.txt, vocab.json", "tokenizer_config.json",
                      "Tongyi-MAI/Z-Image-Turbo", "delete the incomplete")
    assert_recovers(comfy)


def test_fp8_on_the_cpu_is_stored_fp8_and_computed_in_bf16(comfy, loaded_models) -> None:
    r = comfy.run(t2i_prompt(seed=4, dit_dtype="fp8_e4m3fn", te_dtype="fp8_e4m3fn"))
    assert r.success, r.error
    rep = report(r, "1")
    assert "float8_e4m3fn storage / bfloat16 compute" in rep
    assert "DiT: weights stored as fp8_e4m3fn, computed in bfloat16" in rep
    assert "text encoder: weights stored as fp8_e4m3fn, computed in bfloat16" in rep
    assert "DiT: fp8 weights (float8_e4m3fn) with per-tensor scales, bf16 matmuls" in rep
    m = loaded_models[-1]
    qkv = m.dit.layers[0].attention.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale > 0 and not qkv.fp8_matmul
    assert m.dit.x_pad_token.dtype == torch.bfloat16
    up = m.te.module.model.layers[0].mlp.up_proj
    assert up.weight.dtype == torch.float8_e4m3fn and up.weight_scale > 0


POLICY_INPUTS = {"mode": "auto", "vram_budget_gb": 0.0, "dit_weights": "bf16", "attention": "auto",
                 "vae_mode": "auto", "vae_tile": 512, "resident_blocks": -1, "prefetch": 2,
                 "cache_clear_interval": 0, "oom_fallback": True}


def test_fp8_fast_policy_without_fp8_matmuls_falls_back_and_says_so(comfy, loaded_models) -> None:
    """On the CPU (no fp8 matmuls) the policy's fp8_fast becomes fp8 storage with per-tensor scales and bf16
    matmuls; the policy and the loader both say why, and the image is generated."""
    p = t2i_prompt(seed=6)
    p["5"] = {"class_type": "ZImageMemoryPolicy", "inputs": dict(POLICY_INPUTS, dit_weights="fp8_fast")}
    p["1"]["inputs"]["policy"] = ["5", 0]
    r = comfy.run(p)
    assert r.success, r.error
    rep = report(r, "1")
    assert "fp8_fast: fp8 matmuls need a CUDA GPU (the DiT runs on cpu); using fp8 storage" in rep
    assert "DiT: fp8 weights (float8_e4m3fn) with per-tensor scales, bf16 matmuls" in rep
    assert "not implemented" not in rep
    dit = loaded_models[-1].dit
    assert dit.layers[0].feed_forward.w2.weight.dtype == torch.float8_e4m3fn
    assert not any(getattr(m, "fp8_matmul", False) for m in dit.modules())


def test_file_name_not_in_the_folder_list(comfy, extra_models) -> None:
    """ComfyUI's own validation rejects a combo value that is not in the list before our code runs; the user
    sees the input, the value and the list. A file that disappears after validation reaches our error."""
    ok, err, _outputs, node_errors = comfy.validate(loader_prompt(dit_name="z_image_turbo_missing.safetensors"))
    assert not ok and err["type"] == "prompt_outputs_failed_validation"
    e = node_errors["1"]["errors"][0]
    assert e["type"] == "value_not_in_list" and e["message"] == "Value not in list"
    assert "dit_name: 'z_image_turbo_missing.safetensors' not in [" in e["details"]
    assert "'z_image_turbo_bf16.safetensors'" in e["details"]

    folder = extra_models("diffusion_models")
    shutil.copyfile(REPO / "pyproject.toml", folder / "vanishing.safetensors")
    prompt = loader_prompt(dit_name="vanishing.safetensors")
    ok, _err, outputs, _ = comfy.validate(prompt)
    assert ok
    (folder / "vanishing.safetensors").unlink()
    comfy.server.messages = []
    comfy.executor.execute(copy.deepcopy(prompt), unique(), {"client_id": "test"}, outputs)
    err = next(d for e, d in comfy.server.messages if e == "execution_error")
    msg = err["exception_message"]
    assert "'vanishing.safetensors' is not in ComfyUI's 'diffusion_models' model folders" in msg
    assert str(folder) in msg and "Fix: " in msg and "refresh" in msg
    assert_recovers(comfy)


def test_text_encoder_of_the_wrong_width(comfy, extra_models) -> None:
    wide = weights.TESpec(hidden=96, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=48, intermediate=128, vocab=512)
    weights.write_te(extra_models("text_encoders") / "qwen3_other.safetensors", wide)
    r = comfy.run(loader_prompt(text_encoder_name="qwen3_other.safetensors"))
    assert_user_error(r, "qwen3_other.safetensors", "does not fit the DiT z_image_turbo_bf16.safetensors",
                      "text encoder width 96", f"DiT caption width {weights.TINY.dit.cap_feat_dim}",
                      "`text_encoder_name`")
    assert_recovers(comfy)
