"""testing.weights: key lists against ComfyUI's, transformers' and diffusers' own modules, the diffusers
folder loaded by diffusers/transformers, value identity across layouts, finiteness, the writers, the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zimage_nodes.core.st_io import read_header
from zimage_nodes.testing import weights as w

DIFFUSERS = Path("diffusers") / "Z-Image-Turbo"


def _meta(specs: list[w.TensorSpec]) -> dict[str, torch.Tensor]:
    return {s.name: torch.empty(s.shape, device="meta", dtype=torch.bfloat16) for s in specs}


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _spec_shapes(specs: list[w.TensorSpec]) -> dict[str, tuple[int, ...]]:
    return {s.name: s.shape for s in specs}


# ---------------------------------------------------------------- full-size key lists

def test_full_sizes_match_the_real_files() -> None:
    # zimage.md counts the DiT as diffusers builds it: the file's unused norm_final.weight [3840] is not in it.
    for specs, count, params in ((w.dit_tensors(w.FULL.dit), 454, 6_154_908_736 + 3840),
                                 (w.te_tensors(w.FULL.te), 398, 4_022_468_096),
                                 (w.vae_tensors(w.FULL.vae), 244, 83_819_683)):
        assert len(specs) == count and len({s.name for s in specs}) == count
        assert sum(math.prod(s.shape) for s in specs) == params


def test_full_dit_equals_comfyui_nextdit(comfy_modules: Path) -> None:
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    sd = _meta(w.dit_tensors(w.FULL.dit))
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    assert cfg["dim"] == 3840 and cfg["z_image_modulation"] and cfg["pad_tokens_multiple"] == 32
    model = NextDiT(**cfg, operations=comfy.ops.disable_weight_init, device="meta")
    assert _shapes(model.state_dict()) == _shapes(sd)


def _comfy_tiny_nextdit():
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    s = w.TINY.dit
    return NextDiT(patch_size=2, in_channels=16, dim=s.dim, n_layers=s.n_layers, n_refiner_layers=s.n_refiner_layers,
                   n_heads=s.n_heads, n_kv_heads=s.n_heads, ffn_dim_multiplier=8 / 3, qk_norm=True,
                   cap_feat_dim=s.cap_feat_dim, axes_dims=list(s.axes_dims), axes_lens=list(s.axes_lens),
                   rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                   operations=comfy.ops.disable_weight_init, dtype=torch.float32)


def test_tiny_dit_loads_strictly_into_comfyui_nextdit_and_runs(comfy_modules: Path, tiny_models: Path) -> None:
    model = _comfy_tiny_nextdit()
    model.load_state_dict(load_file(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors"), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    cap = torch.randn(1, 7, w.TINY.dit.cap_feat_dim, generator=g)
    with torch.no_grad():
        out = model(x, torch.tensor([0.7]), cap, 7)
    assert out.shape == x.shape and torch.isfinite(out).all() and 0.05 < out.std() < 50


def test_full_te_equals_comfyui_and_transformers(comfy_modules: Path) -> None:
    import comfy.ops
    import transformers
    from comfy.text_encoders.llama import Qwen3_4B
    want = _spec_shapes(w.te_tensors(w.FULL.te))
    comfy_te = Qwen3_4B({}, None, "meta", comfy.ops.disable_weight_init)
    assert _shapes(comfy_te.state_dict()) == want
    config = transformers.Qwen3Config(**w.te_config(w.FULL.te, torch.bfloat16))
    with torch.device("meta"):
        hf = transformers.Qwen3Model(config)
    assert {"model." + k: v for k, v in _shapes(hf.state_dict()).items()} == want
    assert sum(p.numel() for p in hf.parameters()) == 4_022_468_096


def test_full_vae_equals_comfyui_vae(comfy_modules: Path) -> None:
    import comfy.sd
    sd = _meta(w.vae_tensors(w.FULL.vae))
    with torch.device("meta"):
        vae = comfy.sd.VAE(sd=sd)
    assert vae.latent_channels == 16
    assert _shapes(vae.first_stage_model.state_dict()) == _shapes(sd)


def test_full_vae_file_loads_in_comfyui_and_decodes(comfy_modules: Path, tmp_path: Path) -> None:
    import comfy.sd
    path = tmp_path / "ae.safetensors"
    assert w.write_vae(path, "full", seed=3) == [path]
    h = read_header(path)
    assert h.shapes() == _spec_shapes(w.vae_tensors(w.FULL.vae))
    assert h.total_bytes() == 83_819_683 * 2
    vae = comfy.sd.VAE(sd=load_file(path))
    with torch.no_grad():
        image = vae.decode(torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(image).all() and image.std() > 0


# ---------------------------------------------------------------- the diffusers folder

def test_diffusers_folder_layout(tiny_models: Path) -> None:
    folder = tiny_models / DIFFUSERS
    assert json.loads((folder / "model_index.json").read_text()) == w.MODEL_INDEX
    for sub, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        index = json.loads((folder / sub / f"{stem}.safetensors.index.json").read_text())
        shards = sorted(p.name for p in (folder / sub).glob("*.safetensors"))
        assert shards == [f"{stem}-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        headers = {n: read_header(folder / sub / n) for n in shards}
        assert index["weight_map"] == {k: n for n, h in headers.items() for k in h.tensors}
        assert index["metadata"]["total_size"] == sum(h.total_bytes() for h in headers.values())
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"):
        assert (folder / "tokenizer" / name).is_file()
    assert all(i.dtype == "F32" for i in read_header(next((folder / "transformer").glob("*.safetensors"))).tensors.values())


def test_diffusers_scheduler_and_tokenizer(tiny_models: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_models / DIFFUSERS / "scheduler")
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    assert sched.config.num_train_timesteps == 1000
    tok = AutoTokenizer.from_pretrained(tiny_models / DIFFUSERS / "tokenizer")
    assert tok("<|im_start|>user\nhello<|im_end|>").input_ids == [151644, 872, 198, 14990, 151645]


def test_diffusers_vae_loads_with_same_values(tiny_models: Path) -> None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    vae, info = AutoencoderKL.from_pretrained(tiny_models / DIFFUSERS / "vae", output_loading_info=True)
    assert not any(info.values())
    want = convert_ldm_vae_checkpoint(load_file(tiny_models / "vae" / "ae.safetensors"), dict(vae.config))
    got = vae.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k].float(), v.float()), k
    with torch.no_grad():
        image = vae.decode(torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))).sample
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_diffusers_text_encoder_loads_with_same_values(tiny_models: Path) -> None:
    import transformers
    model, info = transformers.Qwen3Model.from_pretrained(tiny_models / DIFFUSERS / "text_encoder",
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    single = load_file(tiny_models / "text_encoders" / "qwen_3_4b.safetensors")
    got = model.state_dict()
    assert {"model." + k for k in got} == set(single)
    for k, v in got.items():
        assert torch.equal(v, single["model." + k]), k
    with torch.no_grad():
        hidden = model(torch.tensor([[151644, 872, 198, 14990, 151645]]), output_hidden_states=True).hidden_states
    assert len(hidden) == w.TINY.te.n_layers + 1 and torch.isfinite(hidden[-2]).all()


def test_tiny_diffusers_transformer_names_match_diffusers(tiny_models: Path) -> None:
    """diffusers hard-codes t_embedder's hidden size (1024) and the FFN width (int(dim/3*8)), which at dim 256
    differ from ComfyUI's; every key name and every other shape matches."""
    from diffusers import ZImageTransformer2DModel
    folder = tiny_models / DIFFUSERS / "transformer"
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(folder))
    got = {k: v for p in folder.glob("*.safetensors") for k, v in read_header(p).shapes().items()}
    want = _shapes(model.state_dict())
    assert set(got) == set(want)
    differ = {k for k in got if got[k] != want[k]}
    assert differ and all(k.startswith("t_embedder.mlp.") or ".feed_forward." in k for k in differ)


def test_diffusers_transformer_loads_with_same_values(tmp_path: Path) -> None:
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    spec = w.diffusers_compatible(w.TINY.dit)
    single, folder = tmp_path / "dit.safetensors", tmp_path / "transformer"
    w.write_dit(single, spec, seed=5, diffusers_dir=folder)
    model, info = ZImageTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values())
    want = convert_z_image_transformer_checkpoint_to_diffusers(load_file(single))
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model([torch.randn(16, 1, 8, 8, generator=g)], torch.tensor([0.3]),
                    [torch.randn(7, spec.cap_feat_dim, generator=g)]).sample
    assert torch.isfinite(out[0]).all()


def test_diffusers_compatible_is_identity_at_full_size() -> None:
    assert w.diffusers_compatible(w.FULL.dit) == w.FULL.dit


# ---------------------------------------------------------------- values across layouts

def test_fp8_and_prefixed_hold_the_same_values(tiny_models: Path) -> None:
    dm = tiny_models / "diffusion_models"
    bf16 = load_file(dm / "z_image_turbo_bf16.safetensors")
    fp8 = load_file(dm / "z_image_turbo_fp8_e4m3fn.safetensors")
    pre = load_file(dm / "z_image_turbo_prefixed.safetensors")
    assert set(fp8) == set(bf16) and set(pre) == {"model.diffusion_model." + k for k in bf16}
    for k, v in bf16.items():
        assert torch.equal(pre["model.diffusion_model." + k], v)
        if v.ndim == 2 and k.endswith(".weight"):
            assert fp8[k].dtype == torch.float8_e4m3fn and torch.equal(fp8[k].view(torch.uint8),
                                                                      v.to(torch.float8_e4m3fn).view(torch.uint8))
        else:
            assert fp8[k].dtype == torch.bfloat16 and torch.equal(fp8[k], v), k
    assert fp8["x_pad_token"].dtype == torch.bfloat16 and bf16["x_pad_token"].float().std() > 0.5


def test_tiny_diffusers_transformer_values(tiny_models: Path) -> None:
    bf16 = load_file(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors")
    folder = tiny_models / DIFFUSERS / "transformer"
    diff = {k: v for p in folder.glob("*.safetensors") for k, v in load_file(p).items()}
    q, k, v = bf16["layers.1.attention.qkv.weight"].float().chunk(3)
    assert torch.equal(diff["layers.1.attention.to_q.weight"], q) and torch.equal(diff["layers.1.attention.to_v.weight"], v)
    assert torch.equal(diff["all_final_layer.2-1.linear.bias"], bf16["final_layer.linear.bias"].float())
    assert "norm_final.weight" not in diff


def test_values_are_deterministic_and_seeded(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    w.write_vae(a, w.TINY.vae, seed=1)
    w.write_vae(b, w.TINY.vae, seed=1)
    w.write_vae(c, w.TINY.vae, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    sd = load_file(a)
    assert abs(sd["decoder.norm_out.weight"].float().mean() - 1) < 0.05
    assert sd["encoder.conv_in.bias"].float().abs().max() < 0.2
    conv = sd["decoder.up.0.block.0.conv1.weight"].float()
    assert abs(conv.std() * math.sqrt(conv[0].numel()) - 1) < 0.05


# ---------------------------------------------------------------- writers and CLI

def test_streaming_writer_checks_order_and_completeness(tmp_path: Path) -> None:
    entries = [("a", torch.float32, (2,)), ("b", torch.bfloat16, (3, 1))]
    wr = w.SafetensorsWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match="announced"):
        wr.write("b", torch.zeros(3, 1, dtype=torch.bfloat16))
    wr.write("a", torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="never written"):
        wr.close()
    assert not (tmp_path / "x.safetensors").exists()
    wr = w.SafetensorsWriter(tmp_path / "y.safetensors", entries, {"k": "v"})
    wr.write("a", torch.tensor([1.0, 2.0]))
    wr.write("b", torch.ones(3, 1, dtype=torch.bfloat16))
    wr.close()
    with safe_open(tmp_path / "y.safetensors", "pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("a"), torch.tensor([1.0, 2.0]))
    assert read_header(tmp_path / "y.safetensors").tensors["b"].shape == (3, 1)


@pytest.mark.parametrize("sizes", [[100, 1, 1, 1, 1], [5] * 9, [1, 2], [7]])
def test_shard_of(sizes: list[int]) -> None:
    shards = w.shard_of(sizes, 3)
    n = min(3, len(sizes))
    assert sorted(set(shards)) == list(range(n)) and shards == sorted(shards)
    if sizes == [5] * 9:
        assert shards == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_cli_writes_requested_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w.main(["--models-dir", str(tmp_path), "--scale", "tiny", "--only", "vae", "--no-diffusers"])
    out = capsys.readouterr().out
    assert "vae" in out and "MB" in out and str(tmp_path / "vae" / "ae.safetensors") in out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["vae/ae.safetensors"]


def test_write_all_returns_paths(tiny_models: Path) -> None:
    assert (tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors").is_file()
    assert (tiny_models / "text_encoders" / "qwen_3_4b.safetensors").is_file()
    with pytest.raises(ValueError, match="tokenizer_src"):
        w.write_all(tiny_models / "unused", "tiny", None)
    with pytest.raises(ValueError, match="scale"):
        w.write_all(tiny_models / "unused", "huge", None)


def test_ensure_single_files_writes_once_and_then_reuses(tmp_path):
    paths = w.ensure_single_files(tmp_path / "models", "tiny")
    assert {p.name for p in paths.values()} == {"z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors",
                                                 "ae.safetensors"}
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert w.ensure_single_files(tmp_path / "models", "tiny") == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps
