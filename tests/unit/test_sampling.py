"""The Euler loop (core/sampling.py), its schedules' input checks, regional compile (core/compile.py), and
numerical parity with diffusers' ZImagePipeline on generated weights.

Measured on the CPU (tiny random weights, 8 DiT forwards, 128x128):
- vs diffusers ZImagePipeline(num_inference_steps=8), fp32: max |diff| / max |latent| 2e-6..4e-6 (from the q/k
  RMSNorm eps, ComfyUI's finfo eps against diffusers' 1e-5, and [caption, image] vs [image, caption] order);
  bf16 DiT in both: ~4e-3; cfg 2.5 against guidance_scale 1.5: ~4e-6 (fp32).
- caption bucket padding (compile) against ComfyUI's 32-padding: identical in fp32 (the extra pads are masked).
"""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from tests.unit.test_dit import TINY, inputs, ours, random_state_dict
from zimage_nodes.core import compile as dit_compile
from zimage_nodes.core import sampling, schedule
from zimage_nodes.core import vae as vae_mod
from zimage_nodes.core.dit import ZImageDiT, dit_config_from_shapes
from zimage_nodes.core.errors import InputError


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def exact_model(target: torch.Tensor):
    """The velocity of the straight path from noise to ``target``: v = (x - x0) / sigma = noise - x0."""
    return lambda x, s, cap: (x - target) / s[:, None, None, None]


# ---------------------------------------------------------------- the Euler loop

@pytest.mark.parametrize("name,steps", [("turbo", 9), ("comfy_simple", 9), ("turbo", 3)])
def test_euler_lands_on_the_clean_latent_with_the_exact_velocity(name, steps):
    g = torch.Generator().manual_seed(0)
    target, noise = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 16, 6, 8, generator=g)
    sigmas = schedule.make_sigmas(name, steps)
    seen: list[sampling.Step] = []
    out = sampling.sample(exact_model(target), noise, sigmas, torch.zeros(1, 4, 8), callback=seen.append)
    assert torch.allclose(out, target, atol=1e-5)
    assert [s.index for s in seen] == list(range(len(sigmas) - 1)) and {s.total for s in seen} == {len(sigmas) - 1}
    assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert all(torch.allclose(s.x0, target, atol=1e-5) for s in seen)


def test_image_to_image_starts_at_sigma0_between_noise_and_input():
    g = torch.Generator().manual_seed(1)
    x_init, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    sigmas = schedule.make_sigmas("turbo", 9, 3.0, 0.3)
    s0 = float(sigmas[0])
    assert 0.2 < s0 < 0.6
    still = sampling.sample(lambda x, s, cap: torch.zeros_like(x), noise, sigmas, torch.zeros(1, 4, 8), x_init=x_init)
    assert torch.allclose(still, s0 * noise + (1 - s0) * x_init, atol=1e-6)  # ComfyUI's noise_scaling
    target = torch.randn(1, 16, 4, 4, generator=g)
    assert torch.allclose(sampling.sample(exact_model(target), noise, sigmas, torch.zeros(1, 4, 8), x_init=x_init),
                          target, atol=1e-5)


def _recording_model(calls: list):
    def fn(x, s, cap):
        calls.append((x.shape[0], cap.shape[1]))
        return x * cap.mean(dim=(1, 2))[:, None, None, None] + s[:, None, None, None]
    return fn


@pytest.mark.parametrize("neg_len", [5, 9])
def test_cfg_batches_the_negative_when_lengths_match_else_calls_twice(neg_len):
    g = torch.Generator().manual_seed(2)
    x, cond, uncond = torch.randn(3, 16, 4, 4, generator=g), torch.randn(1, 5, 8, generator=g), \
        torch.randn(1, neg_len, 8, generator=g)
    sigma = torch.full((3,), 0.7)
    calls: list = []
    v = sampling._guided(_recording_model(calls), x, sigma, cond, uncond, 2.5, 0)
    assert calls == ([(6, 5)] if neg_len == 5 else [(3, 5), (3, neg_len)])
    plain = _recording_model([])
    v_pos, v_neg = plain(x, sigma, cond.expand(3, -1, -1)), plain(x, sigma, uncond.expand(3, -1, -1))
    assert torch.allclose(v, v_neg + 2.5 * (v_pos - v_neg), atol=1e-6)
    calls.clear()
    sampling._guided(_recording_model(calls), x, sigma, cond, uncond, 2.5, 2)  # max_batch 2: chunks of <= 2
    assert all(b <= 2 for b, _ in calls) and sum(b for b, _ in calls) == 6
    calls.clear()
    sampling._guided(_recording_model(calls), x, sigma, cond, uncond, 1.0, 0)  # cfg 1: positive only
    assert calls == [(3, 5)]


@torch.inference_mode()
def test_max_batch_gives_the_same_result_as_the_whole_batch():
    model = ours(TINY, random_state_dict(TINY))
    x, _, cap = inputs(TINY, 1.0, 20, 8, 8, batch=3)
    sigmas = schedule.make_sigmas("turbo", 4)
    whole = sampling.sample(model, x, sigmas, cap[:1])
    assert rel_err(sampling.sample(model, x, sigmas, cap[:1], max_batch=1), whole) < 1e-5
    assert rel_err(sampling.sample(model, x, sigmas, cap[:1], max_batch=2), whole) < 1e-5


@torch.inference_mode()
def test_the_loop_never_reads_the_device():
    """Sampler + DiT on the meta device: any .item()/float()/bool()/.cpu() of a device tensor would raise
    (host syncs on a GPU). Only the callback's Step.x0 (previews) touches the prediction."""
    with pytest.raises(RuntimeError):
        torch.ones(1, device="meta").item()
    model = ZImageDiT(TINY, device="meta")
    noise = torch.randn(2, 16, 8, 8, device="meta")
    cond, uncond = torch.randn(1, 20, 64, device="meta"), torch.randn(1, 33, 64, device="meta")
    seen = []
    out = sampling.sample(model, noise, schedule.make_sigmas("turbo", 9), cond, uncond=uncond, cfg=2.0,
                          x_init=torch.zeros(2, 16, 8, 8, device="meta"), max_batch=1,
                          callback=lambda st: seen.append((st.index, st.sigma)))
    assert out.is_meta and out.shape == noise.shape and [i for i, _ in seen] == list(range(8))
    model.cap_bucket = 128  # the compile layout (masked bucket padding) too
    assert sampling.sample(model, noise, schedule.make_sigmas("turbo", 3), cond).is_meta


def test_check_finite_names_the_context():
    sampling.check_finite(torch.zeros(3), "ctx")
    with pytest.raises(sampling.NonFiniteError) as e:
        sampling.check_finite(torch.tensor([0.0, math.inf, math.nan]), "the DiT computing in float16")
    msg = str(e.value)
    assert "2 of 3" in msg and "float16" in msg and "Fix:" in msg and "dit_dtype" in msg


@pytest.mark.parametrize("args,name", [
    (("turbo", 1), "`steps`"), (("comfy_simple", 0), "`steps`"), (("turbo", 9, 3.0, 1.5), "`denoise`"),
    (("turbo", 9, 3.0, math.nan), "`denoise`"), (("turbo", 9, 0.0), "`shift`"), (("bogus", 9), "`schedule`")])
def test_schedule_errors_name_the_input(args, name):
    with pytest.raises(InputError) as e:
        schedule.make_sigmas(*args)
    assert name in str(e.value) and e.value.expected and e.value.fix


# ---------------------------------------------------------------- regional compile

@torch.inference_mode()
def test_compile_reuses_graphs_within_a_caption_bucket_and_matches_eager():
    model = ours(TINY, random_state_dict(TINY))
    names = list(model.state_dict())
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    x, s, cap = inputs(TINY, 0.5, 20, 8, 8)
    eager = model(x, s, cap)
    try:
        dit_compile.enable(model, cap_bucket=128, backend=counting_backend)
        dit_compile.enable(model, cap_bucket=128, backend=counting_backend)  # idempotent
        assert dit_compile.is_enabled(model) and model.cap_bucket == 128
        assert rel_err(model(x, s, cap), eager) < 1e-5  # bucket padding is masked: same result
        first = len(graphs)
        assert first == 3  # context refiner, noise refiner, main blocks: one graph each for all blocks
        x2, s2, cap2 = inputs(TINY, 0.3, 100, 8, 8, seed=2)  # another length, same 128 bucket
        model(x2, s2, cap2)
        assert len(graphs) == first, "a caption length in the same bucket recompiled"
        x3, s3, cap3 = inputs(TINY, 0.3, 130, 8, 8, seed=3)  # next bucket: new caption shapes only
        model(x3, s3, cap3)
        assert first < len(graphs) <= 2 * first
        assert list(model.state_dict()) == names  # file key names kept
    finally:
        dit_compile.disable(model)
    assert not dit_compile.is_enabled(model) and model.cap_bucket is None
    assert torch.equal(model(x, s, cap), eager)


@torch.inference_mode()
def test_default_compile_has_dynamic_token_dims_one_graph_per_block_kind():
    """The default layout: no bucket, no mask, ComfyUI's padding; other caption lengths and other
    resolutions reuse the three graphs, and every output equals eager's; another batch size gets graphs
    of its own (the batch dimension stays static) and batch 1 keeps using its first graphs."""
    model = ours(TINY, random_state_dict(TINY))
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    cases = [(20, 8, 8), (100, 8, 8), (33, 12, 10), (130, 16, 16), (7, 6, 14)]
    eager = [model(*inputs(TINY, 0.4, n, h, w, seed=i)) for i, (n, h, w) in enumerate(cases)]
    try:
        dit_compile.enable(model, backend=counting_backend)
        assert model.cap_bucket is None and dit_compile.settings(model)["cap_bucket"] is None
        for i, (n, h, w) in enumerate(cases):
            assert rel_err(model(*inputs(TINY, 0.4, n, h, w, seed=i)), eager[i]) < 1e-6, (n, h, w)
            assert len(graphs) == 3, f"caption {n} at {h}x{w} latent recompiled"
        first = model(*inputs(TINY, 0.4, *cases[0], seed=0))
        x, s, cap = inputs(TINY, 0.4, *cases[0], seed=0)
        model(torch.cat([x, x]), s.expand(2), torch.cat([cap, cap]))  # a batch of 2: its own graphs, once
        assert len(graphs) == 6
        assert torch.equal(model(*inputs(TINY, 0.4, *cases[0], seed=0)), first) and len(graphs) == 6
    finally:
        dit_compile.disable(model)


@torch.inference_mode()
def test_a_failing_compiler_is_recognised_for_the_fallback():
    model = ours(TINY, random_state_dict(TINY))

    def broken_backend(gm, example_inputs):
        raise RuntimeError("Cannot find a working triton installation")

    torch._dynamo.reset()
    x, s, cap = inputs(TINY, 0.5, 20, 6, 6)
    try:
        dit_compile.enable(model, backend=broken_backend)
        with pytest.raises(Exception) as e:
            model(x, s, cap)
        assert dit_compile.is_compile_error(e.value)
    finally:
        dit_compile.disable(model)
    assert not dit_compile.is_compile_error(RuntimeError("CUDA out of memory"))
    with pytest.raises(ValueError):
        dit_compile.enable(model, cap_bucket=100)


# ---------------------------------------------------------------- parity with diffusers' ZImagePipeline

@pytest.fixture(scope="module")
def twin(tmp_path_factory, tiny_models):
    """A tiny DiT diffusers can build (weights.diffusers_compatible), as our single file and as a diffusers
    transformer/ folder with the same values, and ZImagePipeline built from components."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    from zimage_nodes.testing import weights
    tmp = tmp_path_factory.mktemp("twin")
    weights.write_dit(tmp / "dit.safetensors", weights.diffusers_compatible(weights.TINY.dit), seed=3,
                      diffusers_dir=tmp / "transformer")
    folder = tiny_models / "diffusers" / "Z-Image-Turbo"
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=Qwen3Model.from_pretrained(folder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        transformer=ZImageTransformer2DModel.from_pretrained(tmp / "transformer", torch_dtype=torch.float32))
    pipe.set_progress_bar_config(disable=True)
    sd = {k: v.float() for k, v in safetensors.torch.load_file(tmp / "dit.safetensors").items()}
    ours_dit = ZImageDiT(dit_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})).eval()
    ours_dit.load_state_dict(sd)
    return pipe, ours_dit


def _ours(dit, noise, cond, uncond=None, cfg=1.0):
    """Our Turbo run (steps=9 -> 8 forwards) as a core LATENT (raw VAE space)."""
    return vae_mod.model_to_raw(sampling.sample(dit, noise, schedule.make_sigmas("turbo", 9), cond,
                                                uncond=uncond, cfg=cfg))


def _diffusers(pipe, noise, cond, uncond=None, guidance=0.0):
    """diffusers' latent is in model space (it decodes latents / scale + shift): bring it to raw space."""
    out = pipe(prompt_embeds=list(cond), negative_prompt_embeds=None if uncond is None else list(uncond),
               latents=noise.clone(), height=8 * noise.shape[2], width=8 * noise.shape[3], num_inference_steps=8,
               guidance_scale=guidance, output_type="latent").images
    return vae_mod.model_to_raw(out.float())


def _case(seed=5, length=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, length, 64, generator=g) * 3


@torch.inference_mode()
def test_turbo_matches_diffusers_pipeline_fp32(twin):
    pipe, dit = twin
    noise, cond = _case()
    ref = _diffusers(pipe, noise, cond)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1
    assert rel_err(_ours(dit, noise, cond), ref) < 2e-5  # measured ~4e-6


@torch.inference_mode()
def test_cfg_matches_diffusers_guidance(twin):
    """ComfyUI's cfg c is diffusers' guidance_scale c - 1 (pos + g * (pos - neg))."""
    pipe, dit = twin
    noise, cond = _case(6)
    uncond = _case(7)[1]
    ref = _diffusers(pipe, noise, cond, uncond, guidance=1.5)
    assert rel_err(_ours(dit, noise, cond, uncond, cfg=2.5), ref) < 2e-5
    assert rel_err(_ours(dit, noise, cond), ref) > 1e-2  # and guidance does change the result


@torch.inference_mode()
def test_turbo_matches_diffusers_pipeline_bf16(twin):
    pipe, dit = twin
    noise, cond = _case(8)
    try:
        pipe.transformer.to(torch.bfloat16)
        ref = _diffusers(pipe, noise, cond.bfloat16())
    finally:
        pipe.transformer.to(torch.float32)
    dit16 = ZImageDiT(dit.cfg, dtype=torch.bfloat16).eval()
    dit16.load_state_dict(dit.state_dict())
    assert rel_err(_ours(dit16, noise, cond), ref) < 3e-2  # measured ~4e-3 (bf16 rounding, q/k norm eps)
