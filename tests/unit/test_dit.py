"""ZImageDiT against ComfyUI's NextDiT and diffusers' ZImageTransformer2DModel on tiny random weights.

Convention notes (details in zimage_nodes/core/dit.py):
- ComfyUI on the CPU uses its sub-quadratic attention (~1e-6 from ours in fp32); with its PyTorch SDPA
  path (what it uses on CUDA) ours is bit-identical in fp32 and bf16.
- diffusers hard-codes the t_embedder hidden size (1024) and the FFN width (int(dim / 3 * 8)), while
  ComfyUI uses min(dim, 1024) and rounds the FFN up to a multiple of 256. At full size both give the
  same shapes; at dim 256 they do not, so the diffusers comparison uses its own tiny twin (TINY_DIFFUSERS).
- diffusers pads captions exactly like ComfyUI (cap_pad_token after the embedder, sequential RoPE
  positions) and, with one caption length per batch, masks nothing either, so caption lengths that are
  not multiples of 32 agree too. Only batches of captions of different lengths differ (diffusers masks);
  ZImageDiT's cap_feats [B, L, C] cannot express that case, so it is not tested.
- q/k RMSNorm eps: ComfyUI (and our default) use torch's finfo(dtype).eps, diffusers 1e-5; this is why
  the diffusers comparison is looser unless qk_norm_eps=1e-5 is set.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from zimage_nodes.core import attention as attn
from zimage_nodes.core.dit import (Attention, DiTConfig, RMSNorm, ZImageDiT, apply_rope, dit_config_from_shapes,
                                   rope_fp8_scale)
from zimage_nodes.core.errors import CheckpointError, InputError

TINY = DiTConfig(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, ffn_hidden=768, cap_feat_dim=64,
                 t_hidden=256, adaln_dim=256)
TINY_DIFFUSERS = replace(TINY, ffn_hidden=682, t_hidden=1024)
FULL = DiTConfig(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, ffn_hidden=10240, cap_feat_dim=2560)
# (sigma, caption length, latent H, W): a caption that is not a multiple of 32, odd latent sizes
CASES = [(1.0, 32, 8, 8), (0.5, 20, 7, 9), (0.05, 45, 6, 10)]


def shapes_of(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ZImageDiT(cfg).state_dict().items()}


def random_state_dict(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in the original file layout with O(1) activations: linear weights ~ 1/sqrt(fan_in),
    norm weights near 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes_of(cfg).items():
        r = torch.randn(shape, generator=g)
        if k.endswith("pad_token"):
            sd[k] = r
        elif k.endswith("bias"):
            sd[k] = 0.1 * r
        elif len(shape) == 1:
            sd[k] = 1 + 0.1 * r
        else:
            sd[k] = r / math.sqrt(shape[1])
    return sd


def inputs(cfg: DiTConfig, sigma: float, cap_len: int, h: int, w: int, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    cap = torch.randn(batch, cap_len, cfg.cap_feat_dim, generator=g)
    return x, torch.full((batch,), sigma), cap


def ours(cfg: DiTConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> ZImageDiT:
    m = ZImageDiT(cfg, dtype=dtype).eval()
    m.load_state_dict(sd, strict=True)
    return m


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def comfy_ops(request, tmp_path_factory):
    """ComfyUI's lumina model, ops and attention modules (through the session fixture, or a bare
    import when the generated-checkpoint fixtures it builds on are unavailable)."""
    try:
        request.getfixturevalue("comfy_modules")
    except Exception:
        from tests.comfy_env import ensure_comfy_importable
        ensure_comfy_importable(tmp_path_factory.mktemp("cb"))
    import comfy.ldm.lumina.model
    import comfy.ldm.modules.attention
    import comfy.ops
    return comfy.ldm.lumina.model, comfy.ops, comfy.ldm.modules.attention


def comfy_nextdit(comfy_ops, sd: dict[str, torch.Tensor], dtype: torch.dtype):
    lumina, ops, _ = comfy_ops
    m = lumina.NextDiT(patch_size=2, in_channels=16, dim=256, n_layers=2, n_refiner_layers=2, n_heads=2,
                       n_kv_heads=2, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True,
                       cap_feat_dim=64, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                       z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                       operations=ops.disable_weight_init, dtype=dtype).eval()
    m.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return m


def test_config_from_shapes_round_trips():
    shapes = shapes_of(TINY)
    assert dit_config_from_shapes(shapes) == TINY
    assert dit_config_from_shapes({"model.diffusion_model." + k: v for k, v in shapes.items()},
                                  prefix="model.diffusion_model.") == TINY
    assert dit_config_from_shapes(shapes_of(TINY_DIFFUSERS)) == TINY_DIFFUSERS
    assert dit_config_from_shapes({k: v for k, v in shapes.items() if k != "norm_final.weight"}) == TINY
    full = shapes_of(FULL)
    assert dit_config_from_shapes(full) == FULL
    # 454 tensors as in z_image_turbo_bf16.safetensors; diffusers' 6,154,908,736 params lack norm_final
    assert len(full) == 454 and sum(math.prod(s) for s in full.values()) == 6_154_908_736 + 3840


@pytest.mark.parametrize("damage", ["missing", "head_dim", "truncated", "extra_refiner"])
def test_config_from_bad_shapes_raises(damage):
    shapes = shapes_of(TINY)
    if damage == "missing":
        del shapes["layers.0.feed_forward.w1.weight"]
    elif damage == "head_dim":
        shapes["layers.0.attention.q_norm.weight"] = (64,)
    elif damage == "truncated":
        del shapes["layers.1.attention.out.weight"]
    else:
        shapes.update({k.replace("context_refiner.1", "context_refiner.2"): v
                       for k, v in shapes.items() if k.startswith("context_refiner.1.")})
    with pytest.raises(CheckpointError) as e:
        dit_config_from_shapes(shapes)
    assert e.value.found and e.value.expected and e.value.fix


@torch.inference_mode()
def test_matches_comfyui_nextdit(comfy_ops, monkeypatch):
    sd = random_state_dict(TINY)
    # fp32 against ComfyUI's CPU attention (sub-quadratic): measured <= 1e-6
    ref_model, model = comfy_nextdit(comfy_ops, sd, torch.float32), ours(TINY, sd)
    for sigma, cap_len, h, w in CASES:
        x, s, cap = inputs(TINY, sigma, cap_len, h, w)
        ref = ref_model(x, s, cap, num_tokens=cap_len)
        assert model(x, s, cap).shape == ref.shape == x.shape
        assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
        assert rel_err(model(x, s, cap), ref) < 1e-5, (sigma, cap_len, h, w)
    x, cap = inputs(TINY, 0.0, 20, 8, 6, batch=2)[::2]  # a batch with different sigmas
    s = torch.tensor([0.9, 0.3])
    assert rel_err(model(x, s, cap), ref_model(x, s, cap, num_tokens=20)) < 1e-5
    # with ComfyUI on PyTorch SDPA (its attention on CUDA) both dtypes are bit-identical
    lumina, _, comfy_attention = comfy_ops
    monkeypatch.setattr(lumina, "optimized_attention_masked", comfy_attention.attention_pytorch)
    for dtype in (torch.float32, torch.bfloat16):
        ref_model, model = comfy_nextdit(comfy_ops, sd, dtype), ours(TINY, sd, dtype)
        for sigma, cap_len, h, w in CASES:
            x, s, cap = inputs(TINY, sigma, cap_len, h, w)
            out = model(x.to(dtype), s, cap.to(dtype))
            assert out.dtype == dtype
            assert torch.equal(out, ref_model(x.to(dtype), s, cap.to(dtype), num_tokens=cap_len))


@torch.inference_mode()
def test_matches_diffusers_with_comfyui_sign():
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    cfg = TINY_DIFFUSERS
    sd = random_state_dict(cfg)
    ref_model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=cfg.dim, n_layers=cfg.n_layers,
        n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, norm_eps=1e-5,
        qk_norm=True, cap_feat_dim=cfg.cap_feat_dim, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]).eval()
    ref_model.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(dict(sd)), strict=True)
    comfy_eps, official_eps = ours(cfg, sd), ours(replace(cfg, qk_norm_eps=1e-5), sd)
    for sigma, cap_len, h, w in [(1.0, 32, 8, 8), (0.5, 20, 6, 10), (0.05, 45, 10, 4)]:  # diffusers: even H, W
        x, s, cap = inputs(cfg, sigma, cap_len, h, w, batch=2)
        # diffusers takes lists of [C, F, H, W] latents and [L, C] captions, t = 1 - sigma, opposite sign
        ref = -torch.stack(ref_model(list(x[:, :, None]), 1 - s, list(cap), return_dict=False)[0])[:, :, 0]
        assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
        assert rel_err(official_eps(x, s, cap), ref) < 1e-5  # measured <= 1e-6
        assert rel_err(comfy_eps(x, s, cap), ref) < 1e-4  # measured <= 5e-6 (q/k norm eps)
    ref = -ref_model.to(torch.bfloat16)(list(x[:, :, None].bfloat16()), 1 - s, list(cap.bfloat16()),
                                        return_dict=False)[0][0][:, 0]
    assert rel_err(comfy_eps.to(torch.bfloat16)(x, s, cap)[0], ref) < 3e-2  # measured ~1e-2 (bf16 rounding)


def test_attention_backend_fallback(monkeypatch):
    assert attn.available_backends()[0] == "sdpa"
    assert attn.resolve_backend("sdpa") == ("sdpa", None)
    with pytest.raises(InputError):
        attn.resolve_backend("bogus")
    monkeypatch.setitem(attn._PACKAGES, "sage", ("zimage_test_no_such_module",))
    monkeypatch.setitem(attn._PACKAGES, "fa3", ("zimage_test_no_fa3", "zimage_test_no_fa3_fwd"))
    attn.forget_backends()
    try:
        backend, reason = attn.resolve_backend("sage")
        assert backend == "sdpa" and "sage" in reason and "sage" not in attn.available_backends()
        assert ZImageDiT(TINY, device="meta").set_attention_backend("sage") == reason
        backend, reason = attn.resolve_backend("fa3")
        assert backend == "sdpa" and "zimage_test_no_fa3 / zimage_test_no_fa3_fwd" in reason
        model = ZImageDiT(TINY, device="meta")
        model.set_attention_backend("fa3")
        assert model.set_fp8_attention(True) is False  # not installed: no fp8 attention, nothing switched on
        assert not any(getattr(m, "fp8", False) for m in model.modules())
    finally:
        attn.forget_backends()
    q, k, v = torch.randn(3, 1, 2, 40, 128).unbind(0)
    assert torch.equal(attn.attention(q, k, v, "flash"), attn.attention(q, k, v))  # CPU fp32 runs as SDPA
    assert not attn.fp8_attention_applies(q.bfloat16(), "fa3")  # fp8 needs FA3 on CUDA


def _rope_freqs(h: int = 4, w: int = 6, cap_len: int = 32) -> torch.Tensor:
    return ZImageDiT(TINY, device="cpu")._rope(cap_len, h, w, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_fp8_scale_bounds_every_input_and_is_tight(dtype):
    """q and k take a static e4m3 scale from their RMSNorm weight (no amax over the sequence): no input can
    push RoPE(norm(x)) past 448 scales, and a vector with one non-zero entry at the weight's largest
    magnitude reaches the bound, so it is no looser than it must be."""
    D = TINY.head_dim
    norm = RMSNorm(D, eps=None, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g) * 0.5)
        norm.weight[17] = -6.0  # an outlier channel, negative
    freqs = _rope_freqs()
    L, H = freqs.shape[0], 3
    x = torch.randn(2, L, H, D, generator=g) * torch.logspace(-4, 4, L)[None, :, None, None]  # all magnitudes
    x[1, :, 0] = 0.0
    x[1, :, 0, 17] = torch.linspace(-1e3, 1e3, L)  # one entry, at the outlier: the bound itself
    x[1, :, 1] = 5.0  # constant vectors
    x[1, :, 2, :2] = 0.0  # tiny eps-dominated vectors
    x = x.to(dtype)
    with torch.no_grad():
        s = rope_fp8_scale(norm)
        y = apply_rope(norm(x), freqs, torch.float32)
    assert s.dtype == torch.float32 and s.dim() == 0
    bound = 448 * s.item()
    assert math.isclose(bound, 6.0 * math.sqrt(D), rel_tol=1e-6)
    over = y.abs().max().item() / bound
    assert over <= 1 + 2 ** -7, over  # only the norm's own rounding (bf16) may graze it
    assert y[1, :, 0].abs().amax().item() / bound > 0.99  # tight: the one-entry vectors reach it


@pytest.fixture
def fa3_stand_in(monkeypatch):
    """FA3 on the CPU: a stand-in with its fp8 signature that dequantizes with the descales it is given and
    runs SDPA in fp32 (the kernel itself needs a Hopper GPU: tests/gpu/test_attention_gpu.py). Records
    what it received."""
    seen: list[dict] = []

    class StandIn:
        @staticmethod
        def flash_attn_func(q, k, v, q_descale=None, k_descale=None, v_descale=None):  # [B, L, H, D]
            seen.append({"dtypes": {q.dtype, k.dtype, v.dtype}, "descales": (q_descale, k_descale, v_descale),
                         "q8": q, "k8": k, "v8": v})
            deq = [t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq)).transpose(1, 2)
            return out.to(torch.bfloat16), None

    attn.forget_backends()
    monkeypatch.setattr(attn, "_module", lambda backend: StandIn)
    monkeypatch.setattr(attn, "FP8_ATTENTION_DEVICES", frozenset({"cuda", "cpu"}))
    yield seen
    attn.forget_backends()


def test_auto_backend_is_fa3_on_hopper_when_installed(fa3_stand_in, monkeypatch):
    """auto = FlashAttention-3 where it is installed and the GPU is a Hopper (9.x), else SDPA."""
    assert attn.auto_backend("cpu") == "sdpa"
    capability = {"now": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    assert attn.auto_backend("cuda") == "fa3" and attn.auto_backend(torch.device("cuda", 1)) == "fa3"
    capability["now"] = (8, 9)  # Ada: FA3 is not built for it
    assert attn.auto_backend("cuda") == "sdpa"
    capability["now"] = (10, 0)
    assert attn.auto_backend("cuda") == "sdpa"
    monkeypatch.setattr(attn, "_module", lambda backend: None)  # not installed
    attn.forget_backends()
    capability["now"] = (9, 0)
    assert attn.auto_backend("cuda") == "sdpa"


@torch.inference_mode()
def test_fp8_attention_quantizes_q_k_statically_v_per_head_and_matches_bf16(fa3_stand_in):
    """The DiT attention's fp8 path (static q/k scales from the norms, per-head v scales, FA3's fp8 forward)
    against the same module's bf16 path, both against fp32: within e4m3 rounding. Heads of very different
    magnitude each keep fp8's relative precision."""
    g = torch.Generator().manual_seed(5)
    cfg = replace(TINY, n_heads=4, axes_dims=(16, 24, 24))  # head_dim 64
    mod = Attention(cfg)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() == 2 else 1.0))
        mod.qkv.weight[2 * cfg.dim:].mul_(torch.tensor([0.01, 1.0, 30.0, 1.0]).repeat_interleave(cfg.head_dim)[:, None])
    freqs = ZImageDiT(cfg, device="cpu")._rope(32, 4, 6, torch.device("cpu"))
    x = torch.randn(2, freqs.shape[0], cfg.dim, generator=g)
    ref = mod.float()(x, freqs)
    mod = mod.bfloat16()
    mod.backend = "fa3"
    assert attn.fp8_attention_applies(x.bfloat16().view(2, -1, 4, 64), "fa3")
    bf16 = mod(x.bfloat16(), freqs)
    assert not fa3_stand_in  # fp8 off: the bf16 path (fa3 falls back to SDPA on the CPU)
    mod.fp8 = True
    out = mod(x.bfloat16(), freqs)
    (call,) = fa3_stand_in
    assert call["dtypes"] == {attn.E4M3} and out.dtype == torch.bfloat16
    sq, sk, sv = call["descales"]
    assert sq.shape == sk.shape == sv.shape == (2, 4)
    assert torch.equal(sq, rope_fp8_scale(mod.q_norm).expand(2, 4)) and torch.equal(sk, rope_fp8_scale(mod.k_norm).expand(2, 4))
    assert torch.equal(call["v8"].float().abs().amax(dim=(1, 3)), torch.full((2, 4), attn.E4M3_MAX))  # v: full range
    assert call["q8"].float().abs().max() <= attn.E4M3_MAX
    err_bf16, err_fp8 = rel_err(bf16, ref), rel_err(out, ref)
    assert err_fp8 < 0.08, (err_fp8, err_bf16)  # e4m3 keeps 3 mantissa bits
    assert err_fp8 > err_bf16  # it did run in fp8
    mod(x.bfloat16(), freqs, mask=torch.ones(1, 1, 1, freqs.shape[0], dtype=torch.bool))
    assert len(fa3_stand_in) == 1  # a mask always runs as SDPA, in bf16


@torch.inference_mode()
def test_meta_build_then_assign_load_has_no_meta_tensors():
    sd = random_state_dict(TINY)
    with torch.device("meta"):
        model = ZImageDiT(TINY)
    model.load_state_dict(sd, strict=True, assign=True)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    calls = []
    model.block_hook = lambda i, block: calls.append((i, block is model.layers[i]))
    x, s, cap = inputs(TINY, 0.7, 20, 6, 6)
    out = model(x, s, cap)
    assert calls == [(0, True), (1, True)] and torch.equal(out, ours(TINY, sd)(x, s, cap))
    model.cap_bucket = 64
    # bucket padding is masked and keeps the 32-padded RoPE positions: same result (core/compile.py)
    assert torch.allclose(model(x, s, cap), out, atol=1e-5) and (64, 3, 3, x.device, 32) in model._rope_cache
