"""core.loader: every layout of the same generated weights loads to the same parameters, tensor by tensor.

The generated checkpoints (tests/conftest.py ``tiny_models``) hold one set of random values written in every
layout users have: the single file, its ``model.diffusion_model.``-prefixed copy, its fp8 repack, and the
diffusers folder (fp32 shards, split q/k/v, diffusers names). Loading each through the real loader code path
(plan -> build on meta -> stream) must give identical parameters.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from zimage_nodes.core import loader, ops
from zimage_nodes.core import st_io
from zimage_nodes.core.errors import CheckpointError
from zimage_nodes.core.identify import Kind
from zimage_nodes.testing import weights

CPU = torch.device("cpu")
DIFFUSERS = Path("diffusers") / "Z-Image-Turbo"
FP32, BF16, FP8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn


# ---------------------------------------------------------------- helpers

def single(tiny_models: Path, rel: str, kind: Kind) -> loader.Source:
    return loader._single(tiny_models / rel, kind, "slot")


def shards(tiny_models: Path, sub: str, kind: Kind) -> loader.Source:
    return loader._shards(tiny_models / DIFFUSERS / sub, kind, f"diffusers_folder/{sub}")


def dit_source(tiny_models: Path, layout: str) -> loader.Source:
    rel = {"single": "z_image_turbo_bf16.safetensors", "prefixed": "z_image_turbo_prefixed.safetensors",
           "fp8": "z_image_turbo_fp8_e4m3fn.safetensors"}
    if layout == "diffusers":
        return shards(tiny_models, "transformer", Kind.ZIMAGE_DIT)
    return single(tiny_models, "diffusion_models/" + rel[layout], Kind.ZIMAGE_DIT)


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, by name."""
    return dict(module.state_dict(keep_vars=True))


def assert_no_meta(module: torch.nn.Module, device: torch.device = CPU) -> None:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        assert not t.is_meta, f"{name} is still on the meta device"
        assert t.device == device, f"{name} is on {t.device}"


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].float(), b[k].float()), f"{k} differs"


class Recorder:
    """Wraps st_io's safe_open so every tensor read is recorded (name, file), plus the module assignments
    the loader makes (name, dtype, device), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, str]] = []
        self.sets: list[tuple[str, torch.dtype, torch.device]] = []
        self.events: list[str] = []  # "read" / "set" in order
        real_open, real_set = st_io.safe_open, loader.set_module_tensor
        rec = self

        class Handle:
            def __init__(self, path: str, **kw):
                self._cm = real_open(path, **kw)
                self._path = Path(path).name

            def __enter__(self):
                self._f = self._cm.__enter__()
                return self

            def __exit__(self, *exc):
                return self._cm.__exit__(*exc)

            def keys(self):
                return self._f.keys()

            def get_tensor(self, name):
                rec.reads.append((name, self._path))
                rec.events.append("read")
                return self._f.get_tensor(name)

        def record_set(module, name, value):
            rec.sets.append((name, value.dtype, value.device))
            rec.events.append("set")
            return real_set(module, name, value)

        monkeypatch.setattr(st_io, "safe_open", Handle)
        monkeypatch.setattr(loader, "set_module_tensor", record_set)


# ---------------------------------------------------------------- DiT

@pytest.fixture(scope="module")
def dit_reference(tiny_models: Path) -> dict[str, torch.Tensor]:
    """The single bf16 file loaded in fp32 (every bf16 value is exact in fp32)."""
    src = dit_source(tiny_models, "single")
    model = loader.load_dit(src, CPU, FP32, FP32)
    assert_no_meta(model)
    return tensors(model)


@pytest.mark.parametrize("layout", ["single", "prefixed", "diffusers"])
def test_dit_layouts_load_identical_parameters(tiny_models: Path, dit_reference, layout: str) -> None:
    src = dit_source(tiny_models, layout)
    assert src.layout == ("diffusers" if layout == "diffusers" else "single")
    assert src.prefix == ("model.diffusion_model." if layout == "prefixed" else "")
    model = loader.load_dit(src, CPU, FP32, FP32)
    assert_no_meta(model)
    got, want = tensors(model), dict(dit_reference)
    if layout == "diffusers":  # diffusers' converter drops norm_final (unused by the forward): ones
        assert torch.equal(got.pop("norm_final.weight"), torch.ones_like(want.pop("norm_final.weight")))
    assert_same(got, want)


def test_dit_fp8_repack_equals_the_rounded_values(tiny_models: Path, dit_reference) -> None:
    """fp32 storage of the fp8 file = the reference with its 2-D matmul weights rounded to fp8 (the repack's rule)."""
    model = loader.load_dit(dit_source(tiny_models, "fp8"), CPU, FP32, FP32)
    got = tensors(model)
    rounded = 0
    for k, ref in dit_reference.items():
        fp8 = ref.ndim == 2 and k.endswith(".weight")
        want = ref.to(FP8).to(FP32) if fp8 else ref
        rounded += fp8
        assert got[k].dtype == FP32
        assert torch.equal(got[k], want), k
    assert rounded > 20


def test_dit_fp8_storage_keeps_fp8_matrices_and_computes_in_compute_dtype(tiny_models: Path, dit_reference) -> None:
    """fp8 storage: matmul weights fp8 with a per-tensor scale (quantized from the bf16 file as it streams:
    weight / scale, scale = amax / 448), everything else in the compute dtype; the forward stays close to the
    bf16 model's."""
    with torch.inference_mode():
        bf16 = loader.load_dit(dit_source(tiny_models, "single"), CPU, BF16, BF16)
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        cap = torch.randn(1, 5, bf16.cap_embedder[1].weight.shape[1], generator=torch.Generator().manual_seed(1))
        want = bf16(x.to(BF16), torch.tensor([0.5]), cap.to(BF16)).float()
    for compute in (BF16, FP32):
        model = loader.load_dit(dit_source(tiny_models, "single"), CPU, FP8, compute)
        assert_no_meta(model)
        scaled = 0
        for k, t in tensors(model).items():
            ref = dit_reference[k]
            matrix = ref.ndim == 2 and min(ref.shape) > 1 and k.endswith("weight") and "pad_token" not in k
            assert t.dtype == (FP8 if matrix else compute), k
            if not matrix:
                assert torch.equal(t.float(), ref.to(t.dtype).float()), k
                continue
            layer = model.get_submodule(k[:-len(".weight")])
            q, scale = ops.quantize_fp8(ref)
            assert layer.weight_scale.dtype == FP32 and layer.weight_scale == scale, k
            assert torch.allclose(scale, ref.abs().max() / 448, rtol=2 ** -8), k
            assert torch.equal(t.view(torch.uint8), q.view(torch.uint8)), k
            deq = ops.dequantize(layer)
            assert ((deq - ref).abs() <= ref.abs() / 16 + scale / 1024).all(), k  # e4m3 rounding
            scaled += 1
        assert scaled > 20
        assert not any(m.fp8_matmul for m in model.modules() if isinstance(m, ops.CastLinear))
        with torch.inference_mode():
            v = model(x.to(compute), torch.tensor([0.5]), cap.to(compute))
        assert v.shape == x.shape and v.dtype == compute and torch.isfinite(v).all()
        assert ((v.float() - want).norm() / want.norm()).item() < 0.1  # fp8 weight rounding (+ bf16)


def test_dit_fp8_storage_of_a_plain_fp8_repack_keeps_its_bytes_with_scale_one(tiny_models: Path) -> None:
    src = dit_source(tiny_models, "fp8")
    model = loader.load_dit(src, CPU, FP8, BF16)
    raw = {k: v for k, v in _file_tensors(src).items()}
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, ops.CastLinear) and m.weight.dtype == FP8:
            assert m.weight_scale == 1, name
            assert torch.equal(m.weight.view(torch.uint8), raw[name + ".weight"].view(torch.uint8)), name
            n += 1
    assert n > 20


def test_dit_fp8_storage_is_the_same_from_every_layout(tiny_models: Path) -> None:
    """The diffusers folder (fp32 shards, split q/k/v) quantizes the fused qkv as one tensor: the same fp8
    bytes and scales as the bf16 single file (whose values it holds)."""
    a = loader.load_dit(dit_source(tiny_models, "single"), CPU, FP8, BF16)
    b = loader.load_dit(dit_source(tiny_models, "diffusers"), CPU, FP8, BF16)
    sa, sb = dict(a.named_buffers()), dict(b.named_buffers())
    assert sa.keys() == sb.keys() and any(k.endswith("attention.qkv.weight_scale") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k, t in tensors(a).items():
        if t.dtype == FP8:
            assert torch.equal(t.view(torch.uint8), tensors(b)[k].view(torch.uint8)), k


def test_fp8_matmul_flag_at_load_time(tiny_models: Path) -> None:
    model = loader.load_dit(dit_source(tiny_models, "single"), CPU, FP8, BF16, fp8_matmul=True)
    flagged = {n for n, m in model.named_modules() if isinstance(m, ops.CastLinear) and m.fp8_matmul}
    assert flagged and all(n.rsplit(".", 1)[-1] in ("qkv", "out", "w1", "w2", "w3") for n in flagged)
    assert "x_embedder" not in flagged and "final_layer.linear" not in flagged


def _file_tensors(src: loader.Source) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for h in src.headers:
        out.update(load_file(str(h.path)))
    return out


def test_dit_fp32_shards_convert_to_bf16_while_streaming(tiny_models: Path, dit_reference,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The diffusers shards are fp32; bf16 storage converts each tensor as it streams (the module is never
    fp32), every file tensor is read exactly once, and the parameters equal the bf16 single file."""
    src = dit_source(tiny_models, "diffusers")
    assert {i.dtype for h in src.headers for i in h.tensors.values()} == {"F32"}
    rec = Recorder(monkeypatch)
    seen: list[tuple[int, int]] = []
    model = loader.load_dit(src, CPU, BF16, BF16, progress=lambda d, t: seen.append((d, t)))
    assert_no_meta(model)
    file_keys = [k for h in src.headers for k in h.tensors]
    assert sorted(n for n, _ in rec.reads) == sorted(file_keys)  # each once
    assert {d for _, d, _ in rec.sets} == {BF16}
    assert {dev for _, _, dev in rec.sets} == {CPU}
    assert seen == [(i + 1, len(file_keys)) for i in range(len(file_keys))]
    for k, t in tensors(model).items():
        assert t.dtype == BF16, k
        if k != "norm_final.weight":  # not in diffusers folders (unused)
            assert torch.equal(t, dit_reference[k].to(BF16)), k


def test_dit_streams_one_tensor_at_a_time(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tensor read from the file is placed in the module before the next one is read (no state dict
    of the whole file is gathered first); the split q/k/v rows are the only tensors held back, three at most."""
    src = dit_source(tiny_models, "diffusers")
    rec = Recorder(monkeypatch)
    loader.load_dit(src, CPU, BF16, BF16)
    pending = most = 0
    sets = iter(rec.sets)
    for e in rec.events:
        if e == "read":
            pending += 1
        else:  # a fused qkv takes its three split pieces; norm_final (not in diffusers folders) none
            name = next(sets)[0]
            pending -= 3 if name.endswith("attention.qkv.weight") else 0 if name == "norm_final.weight" else 1
        most = max(most, pending)
    assert pending == 0
    assert most <= 3, f"{most} tensors read before being placed"


def test_dit_parameter_names_are_the_file_keys(tiny_models: Path, dit_reference) -> None:
    header = st_io.read_header(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors")
    assert set(dit_reference) == set(header.tensors)


# ---------------------------------------------------------------- VAE

def test_vae_bfl_and_diffusers_layouts_load_identical_parameters(tiny_models: Path) -> None:
    bfl = single(tiny_models, "vae/ae.safetensors", Kind.FLUX_VAE)
    diff = shards(tiny_models, "vae", Kind.FLUX_VAE)
    seen: list[tuple[int, int]] = []
    a = loader.load_vae(bfl, CPU, FP32, progress=lambda d, t: seen.append((d, t)))
    b = loader.load_vae(diff, CPU, FP32)
    assert_no_meta(a.model)
    assert_no_meta(b.model)
    assert_same(tensors(a.model), tensors(b.model))
    n = len(bfl.headers[0].tensors)
    assert seen[-1] == (n, n) and len(seen) == n
    # the values are the file's (the attention 1x1 convs reshaped to Linear weights)
    w = st_io.read_header(tiny_models / "vae" / "ae.safetensors")
    assert sum(t.numel() for t in tensors(a.model).values()) == sum(
        torch.Size(i.shape).numel() for i in w.tensors.values())


def test_vae_bf16_conversion_while_streaming(tiny_models: Path) -> None:
    vae = loader.load_vae(single(tiny_models, "vae/ae.safetensors", Kind.FLUX_VAE), CPU, BF16)
    ref = loader.load_vae(single(tiny_models, "vae/ae.safetensors", Kind.FLUX_VAE), CPU, FP32)
    assert {t.dtype for t in tensors(vae.model).values()} == {BF16}
    for k, t in tensors(vae.model).items():
        assert torch.equal(t, tensors(ref.model)[k].to(BF16)), k


# ---------------------------------------------------------------- text encoder

def _te(source: loader.Source, storage=FP32, compute=FP32) -> torch.nn.Module:
    return loader.LazyTextEncoder(source, CPU, storage, compute).get()


def test_text_encoder_single_file_and_shards_load_identical_parameters(tiny_models: Path) -> None:
    one = single(tiny_models, "text_encoders/qwen_3_4b.safetensors", Kind.QWEN3_TE)
    many = shards(tiny_models, "text_encoder", Kind.QWEN3_TE)
    assert len(many.headers) > 1
    a, b = _te(one), _te(many)
    assert_no_meta(a)
    assert_no_meta(b)
    assert_same(tensors(a), tensors(b))
    # the last layer and the final norm are neither built nor read
    n_layers = weights.TINY.te.n_layers
    assert not any(k.startswith(f"model.layers.{n_layers - 1}.") for k in tensors(a))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(a(ids), b(ids))


def test_text_encoder_reads_only_what_it_builds(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = single(tiny_models, "text_encoders/qwen_3_4b.safetensors", Kind.QWEN3_TE)
    rec = Recorder(monkeypatch)
    seen: list[tuple[int, int]] = []
    lazy = loader.LazyTextEncoder(src, CPU, BF16, BF16)
    assert lazy.module is None
    lazy.get(progress=lambda d, t: seen.append((d, t)))
    last = weights.TINY.te.n_layers - 1
    read = {n for n, _ in rec.reads}
    assert not any(n.startswith(f"model.layers.{last}.") or n == "model.norm.weight" for n in read)
    assert len(read) == len(rec.reads) == seen[-1][1] == len(seen)
    assert {d for _, d, _ in rec.sets} == {BF16}
    assert lazy.get() is lazy.module  # built once


def test_text_encoder_fp8_storage(tiny_models: Path) -> None:
    src = single(tiny_models, "text_encoders/qwen_3_4b.safetensors", Kind.QWEN3_TE)
    ref, fp8 = _te(src), _te(src, FP8, FP32)
    assert_no_meta(fp8)
    for k, t in tensors(fp8).items():
        r = tensors(ref)[k]
        matrix = r.ndim == 2 and min(r.shape) > 1 and "embed_tokens" not in k  # the table is indexed
        assert t.dtype == (FP8 if matrix else FP32), k
        if matrix:  # the same per-tensor scales as the DiT's fp8 storage (no fp8 matmuls)
            layer = fp8.get_submodule(k[:-len(".weight")])
            assert isinstance(layer, ops.CastLinear) and not layer.fp8_matmul, k
            assert torch.allclose(layer.weight_scale, r.abs().max() / 448, rtol=2 ** -8), k
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        out, want = fp8(ids), ref(ids)
    assert out.dtype == FP32 and torch.isfinite(out).all()
    assert (out - want).abs().max() < 0.25 * want.abs().max()  # fp8 rounding only


# ---------------------------------------------------------------- plans

def test_plan_single_files_and_diffusers_folder(tiny_models: Path) -> None:
    tok = tiny_models / DIFFUSERS / "tokenizer"
    a = loader.plan_single_files(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors",
                                 tiny_models / "text_encoders" / "qwen_3_4b.safetensors",
                                 tiny_models / "vae" / "ae.safetensors", tok)
    b = loader.plan_diffusers_folder(tiny_models / DIFFUSERS, Path("/nonexistent"))
    assert (a.dit.layout, b.dit.layout) == ("single", "diffusers")
    assert b.tokenizer_dir == tok and b.notes == []
    assert len(b.dit.headers) == weights.N_SHARDS


def _folder_copy(tiny_models: Path, dst: Path, *, tokenizer: bool = True) -> Path:
    """A diffusers folder whose weight sub-folders link to the generated ones."""
    src = tiny_models / DIFFUSERS
    dst.mkdir(parents=True)
    shutil.copyfile(src / "model_index.json", dst / "model_index.json")
    for sub in ("transformer", "text_encoder", "vae"):
        (dst / sub).symlink_to(src / sub, target_is_directory=True)
    if tokenizer:
        shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return dst


def test_diffusers_folder_without_tokenizer_falls_back_with_a_note(tiny_models: Path, tmp_path: Path) -> None:
    folder = _folder_copy(tiny_models, tmp_path / "Z", tokenizer=False)
    fallback = tiny_models / DIFFUSERS / "tokenizer"
    plan = loader.plan_diffusers_folder(folder, fallback)
    assert plan.tokenizer_dir == fallback
    assert any("no tokenizer/" in n and "ComfyUI" in n for n in plan.notes)
    assert loader.load_tokenizer(plan) is not None


def test_incomplete_tokenizer_folder_is_a_clear_error(tiny_models: Path, tmp_path: Path) -> None:
    folder = _folder_copy(tiny_models, tmp_path / "Z")
    for name in ("tokenizer_config.json", "tokenizer.json"):
        (folder / "tokenizer" / name).unlink()
    plan = loader.plan_diffusers_folder(folder, Path("/nonexistent"))
    with pytest.raises(CheckpointError) as e:
        loader.load_tokenizer(plan)
    err = e.value
    assert str(folder / "tokenizer") in err.what
    assert "merges.txt" in err.found and "vocab.json" in err.found
    assert "tokenizer_config.json" in err.expected
    assert "tokenizer/" in err.fix and "delete" in err.fix


def test_shard_index_selects_the_files(tiny_models: Path, tmp_path: Path) -> None:
    """With an index, only the shards it names are read (a stray variant file beside them is ignored);
    a shard the index names but the folder lacks is an incomplete download."""
    src = tiny_models / DIFFUSERS / "transformer"
    dst = tmp_path / "transformer"
    shutil.copytree(src, dst)
    shutil.copyfile(dst / "diffusion_pytorch_model-00001-of-00003.safetensors",
                    dst / "diffusion_pytorch_model.fp16.safetensors")
    source = loader._shards(dst, Kind.ZIMAGE_DIT, "diffusers_folder/transformer")
    assert sorted(h.path.name for h in source.headers) == sorted(
        p.name for p in src.glob("*.safetensors"))
    (dst / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        loader._shards(dst, Kind.ZIMAGE_DIT, "diffusers_folder/transformer")
    assert "diffusion_pytorch_model-00002-of-00003.safetensors" in str(e.value)
    assert e.value.fix and e.value.expected


def test_duplicate_tensors_across_shards_without_index(tiny_models: Path, tmp_path: Path) -> None:
    dst = tmp_path / "text_encoder"
    dst.mkdir()
    one = tiny_models / "text_encoders" / "qwen_3_4b.safetensors"
    shutil.copyfile(one, dst / "model.safetensors")
    shutil.copyfile(one, dst / "model.fp16.safetensors")
    with pytest.raises(CheckpointError) as e:
        loader._shards(dst, Kind.QWEN3_TE, "diffusers_folder/text_encoder")
    assert "model.fp16.safetensors" in str(e.value) and "model.safetensors" in str(e.value)


def test_text_encoder_of_another_width_is_refused_before_loading(tiny_models: Path, tmp_path: Path) -> None:
    wide = weights.TESpec(hidden=96, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=48, intermediate=128, vocab=512)
    te = tmp_path / "qwen3_wide.safetensors"
    weights.write_te(te, wide)
    with pytest.raises(CheckpointError) as e:
        loader.plan_single_files(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors", te,
                                 tiny_models / "vae" / "ae.safetensors", tiny_models / DIFFUSERS / "tokenizer")
    err = e.value
    assert "qwen3_wide.safetensors" in err.what and "z_image_turbo_bf16.safetensors" in err.what
    assert "96" in err.found and str(weights.TINY.dit.cap_feat_dim) in err.found
    assert "text_encoder_name" in err.fix


def test_file_with_extra_or_misshapen_tensors_is_a_checkpoint_error(tiny_models: Path, tmp_path: Path) -> None:
    """Tensors the DiT has no place for, or of the wrong shape, are refused before anything is read."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors"))
    extra = dict(sd, **{"layers.0.attention.extra_proj.weight": torch.zeros(4, 4, dtype=BF16)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    src = loader._single(tmp_path / "extra.safetensors", Kind.ZIMAGE_DIT, "dit_name")
    with pytest.raises(CheckpointError) as e:
        loader.load_dit(src, CPU, FP32, FP32)
    assert "extra.safetensors" in e.value.what and "extra_proj" in e.value.found

    bad = dict(sd)
    bad["final_layer.linear.bias"] = torch.zeros(3, dtype=BF16)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    src = loader._single(tmp_path / "bad.safetensors", Kind.ZIMAGE_DIT, "dit_name")
    with pytest.raises(CheckpointError) as e:
        loader.load_dit(src, CPU, FP32, FP32)
    assert "final_layer.linear.bias" in e.value.found and e.value.fix


def test_resident_bytes_follow_the_storage_dtype(tiny_models: Path) -> None:
    src = dit_source(tiny_models, "diffusers")  # fp32 on disk
    n = sum(torch.Size(i.shape).numel() for h in src.headers for i in h.tensors.values())
    assert loader.resident_bytes(src, FP32, FP32) == src.nbytes == 4 * n
    assert loader.resident_bytes(src, BF16, BF16) == 2 * n
    fp8 = loader.resident_bytes(src, FP8, BF16)
    assert n < fp8 < 2 * n


def test_choose_dtypes_fp8_on_cpu_is_storage_only() -> None:
    notes: list[str] = []
    assert loader.choose_dtypes("fp8_e4m3fn", CPU, "DiT", "dit_dtype", notes) == (FP8, BF16)
    assert "stored as fp8_e4m3fn" in notes[0] and "computed in bfloat16" in notes[0]
    assert loader.choose_dtypes("auto", CPU, "DiT", "dit_dtype", []) == (FP32, FP32)
    notes = []
    assert loader.choose_dtypes("fp16", CPU, "vae", "vae_dtype", notes) == (BF16, BF16)
    assert "NaN" in notes[0]


def test_index_json_is_valid_for_the_generated_folder(tiny_models: Path) -> None:
    idx = json.loads((tiny_models / DIFFUSERS / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
                     .read_text())
    assert set(idx["weight_map"].values()) == {p.name for p in (tiny_models / DIFFUSERS / "transformer")
                                              .glob("*.safetensors")}


def test_embedding_identity_names_the_files_and_the_dtypes(tiny_models: Path) -> None:
    src = single(tiny_models, "text_encoders/qwen_3_4b.safetensors", Kind.QWEN3_TE)
    a = loader.LazyTextEncoder(src, CPU, BF16, BF16)
    assert str((tiny_models / "text_encoders" / "qwen_3_4b.safetensors").resolve()) in a.identity
    assert a.identity == loader.LazyTextEncoder(src, CPU, BF16, BF16).identity
    assert a.identity != loader.LazyTextEncoder(src, CPU, FP32, FP32).identity
    assert a.identity != loader.LazyTextEncoder(src, CPU, FP8, BF16).identity
    assert loader.LazyTextEncoder(src, CPU, FP8, BF16).identity.endswith(";float8_e4m3fn-scaled/bfloat16")
    assert a.n_tensors == len(te_key_map_of(src)) and a.nbytes == loader.resident_bytes(
        src, BF16, BF16, te_key_map_of(src))


def te_key_map_of(src: loader.Source) -> dict[str, str]:
    from zimage_nodes.core.text_encoder import te_key_map
    return te_key_map(src.shapes, src.prefix)


def test_diffusers_subfolder_with_only_pickle_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")

    def banned(*_a, **_k):
        raise AssertionError("unpickled")
    for obj, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(obj, name, banned)
    with pytest.raises(CheckpointError) as e:
        loader._shards(folder, Kind.QWEN3_TE, "diffusers_folder/text_encoder")
    assert "pytorch_model.bin" in e.value.found and "safetensors" in e.value.fix


def test_embedding_identity_survives_the_file_moving(tiny_models: Path, tmp_path: Path) -> None:
    te = tmp_path / "qwen.safetensors"
    shutil.copyfile(tiny_models / "text_encoders" / "qwen_3_4b.safetensors", te)
    lazy = loader.LazyTextEncoder(loader._single(te, Kind.QWEN3_TE, "text_encoder_name"), CPU, BF16, BF16)
    before = lazy.identity
    te.unlink()
    assert lazy.identity == before


def test_scaled_fp8_repack_keeps_its_scales_or_is_dequantized(tiny_models: Path, dit_reference,
                                                             tmp_path: Path) -> None:
    """ComfyUI's "scaled fp8" layout stores weight / scale in fp8 with ``<layer>.scale_weight`` beside it (and a
    ``scaled_fp8`` marker). fp8 storage keeps the file's fp8 weight and scale as they are (no requantization);
    bf16/fp32 storage multiplies the scale back in. Every storage computes with the same weights."""
    from safetensors.torch import save_file
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    want: dict[str, torch.Tensor] = {}
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, ref in dit_reference.items():
        if ref.ndim == 2 and k.endswith(".weight") and min(ref.shape) > 1:
            scale = ref.abs().max() / 448.0  # any fp32 value (not rounded to bf16 like ours)
            q = (ref / scale).to(FP8)
            sd[k], sd[k[:-len("weight")] + "scale_weight"] = q, scale.reshape(())
            want[k] = q.float().mul_(scale)
            stored[k] = q, scale
        else:
            sd[k] = ref.to(BF16)
            want[k] = ref
    save_file(sd, str(tmp_path / "z_image_turbo_fp8_scaled.safetensors"))
    src = loader._single(tmp_path / "z_image_turbo_fp8_scaled.safetensors", Kind.ZIMAGE_DIT, "dit_name")
    got = tensors(loader.load_dit(src, CPU, FP32, FP32))
    for k, w in want.items():
        assert torch.equal(got[k], w), k
    assert (got["layers.0.attention.qkv.weight"] - dit_reference["layers.0.attention.qkv.weight"]).abs().max() \
        < 0.1 * dit_reference["layers.0.attention.qkv.weight"].abs().max()
    bf16 = tensors(loader.load_dit(src, CPU, BF16, BF16))
    fp8_model = loader.load_dit(src, CPU, FP8, BF16)
    fp8 = tensors(fp8_model)
    for k, (q, scale) in stored.items():
        layer = fp8_model.get_submodule(k[:-len(".weight")])
        assert fp8[k].dtype == FP8 and torch.equal(fp8[k].view(torch.uint8), q.view(torch.uint8)), k
        assert layer.weight_scale == scale, k  # the file's fp32 scale, unchanged
        assert torch.equal(ops.dequantize(layer), want[k]), k  # the same weights as fp32 storage
        assert torch.equal(bf16[k], want[k].to(BF16)), k
    x = torch.randn(1, 16, 8, 8).to(BF16)
    cap = torch.randn(1, 5, fp8_model.cap_embedder[1].weight.shape[1]).to(BF16)
    with torch.inference_mode():
        a = fp8_model(x, torch.tensor([0.5]), cap).float()
        b = loader.load_dit(src, CPU, BF16, BF16)(x, torch.tensor([0.5]), cap).float()
    assert ((a - b).norm() / b.norm()).item() < 0.05  # bf16 rounding of the same weights only
