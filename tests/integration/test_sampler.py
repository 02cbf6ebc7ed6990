"""ZImageSampler inside the real ComfyUI executor: numerical parity with diffusers and with ComfyUI's native
KSampler on the same weights and noise, determinism, progress/previews/interruption, CFG, batching,
image-to-image, and bad inputs (each leaves ComfyUI able to run the next prompt).

All at 256x256 on the CPU with the tiny generated checkpoints (fp32 DiT: the loader's "auto" on a CPU); tests
whose point is not the schedule run 2-4 DiT forwards (FAST) to keep the suite quick.
Measured: vs diffusers ZImagePipeline(num_inference_steps=8) ~4e-6 of the latent's max; vs ComfyUI's
KSampler (euler, simple, ModelSamplingAuraFlow 3, 9 steps, cfg 1) ~5e-6 with ComfyUI's CPU attention
and with SDPA alike (the rest is the Euler step's arithmetic: ComfyUI goes through x0 and back).
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import safetensors.torch
import torch

from zimage_nodes.core import vae as vae_mod

SIZE = 256
TWIN_DIT = "z_image_diffusers_twin.safetensors"
OVERFLOW_DIT = "z_image_overflow_test.safetensors"
FULL_VAE = "ae_full_size.safetensors"  # also written by tests/integration/test_comfy_loaders.py
PROMPT = "a red fox sitting in fresh snow"
FAST = 3  # turbo steps=3: 2 DiT forwards


def graph(*, seed: int = 1, width: int = SIZE, height: int = SIZE, steps: int = 9, schedule: str = "turbo",
          cfg: float = 1.0, batch_size: int = 1, max_batch: int = 0, denoise: float | list = 1.0,
          text: str = PROMPT, negative: str | None = None, dit: str = "z_image_turbo_bf16.safetensors",
          dit_dtype: str = "auto", vae: str = "ae.safetensors", **extra_inputs) -> dict:
    """Loader "1" -> Text Encode "2" (and "5" for a negative) -> Sampler "3" -> PreviewImage "4"."""
    prompt = {
        "1": {"class_type": "ZImageLoader", "inputs": {
            "dit_name": dit, "text_encoder_name": "qwen_3_4b.safetensors", "vae_name": vae,
            "diffusers_folder": "none", "dit_device": "auto", "dit_dtype": dit_dtype, "te_device": "auto",
            "te_dtype": "auto", "vae_device": "auto", "vae_dtype": "auto"}},
        "2": {"class_type": "ZImageTextEncode", "inputs": {"model": ["1", 0], "text": text}},
        "3": {"class_type": "ZImageSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "width": width, "height": height, "seed": seed,
            "steps": steps, "schedule": schedule, "shift": 3.0, "cfg": cfg, "batch_size": batch_size,
            "max_batch": max_batch, "denoise": denoise, **extra_inputs}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    if negative is not None:
        prompt["5"] = {"class_type": "ZImageTextEncode", "inputs": {"model": ["1", 0], "text": negative}}
        prompt["3"]["inputs"]["negative"] = ["5", 0]
    return prompt


def output(comfy, node_id: str, index: int = 0):
    """A node's output value from the executor's output cache (right after the run)."""
    return comfy.executor.caches.outputs.get(node_id).outputs[index][0]


def run_ok(comfy, prompt: dict):
    result = comfy.run(prompt)
    assert result.success, result.error
    return result


def report(comfy) -> str:
    return output(comfy, "3", 2)


def pack_module(name: str):
    """The pack's module as ComfyUI imported it (from custom_nodes/, under another package name than the
    tests' ``zimage_nodes``)."""
    found = [m for key, m in sys.modules.items()
             if key.endswith(name) and key != name and "custom_nodes" in (getattr(m, "__file__", "") or "")]
    assert len(found) == 1, [key for key in sys.modules if key.endswith(name)]
    return found[0]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@contextlib.contextmanager
def progress_events(interrupt_at: tuple[str, int] | None = None):
    """Record (node id, value, total, preview) of every progress update; optionally interrupt the prompt
    (as the UI's Cancel button does) right after node ``interrupt_at[0]`` reported value ``interrupt_at[1]``."""
    import comfy.model_management as mm
    import comfy.utils as comfy_utils
    from comfy_execution.utils import get_executing_context
    inner = comfy_utils.PROGRESS_BAR_HOOK
    events: list[tuple[str | None, int, int, object]] = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        node = node_id or (ctx.node_id if ctx is not None else None)
        events.append((node, int(value), int(total), preview))
        inner(value, total, preview, prompt_id=prompt_id, node_id=node_id)
        if interrupt_at is not None and (node, int(value)) == interrupt_at:
            mm.interrupt_current_processing()

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        yield events
    finally:
        comfy_utils.set_progress_bar_global_hook(inner)


def sampler_events(events) -> list[tuple[int, int, object]]:
    return [(v, t, p) for node, v, t, p in events if node == "3"]


def good_prompt_still_runs(comfy, seed: int) -> None:
    """After a failed prompt ComfyUI runs the next one (one DiT forward keeps it cheap)."""
    result = run_ok(comfy, graph(seed=seed, steps=2))
    assert output(comfy, "3", 1).shape == (1, SIZE, SIZE, 3)
    assert result.outputs["4"]["images"]


# ---------------------------------------------------------------- numerical truth

@pytest.fixture(scope="module")
def diffusers_twin(comfy, tmp_path_factory):
    """The same random weights for us (a single file in models/diffusion_models) and for diffusers (its
    transformer/ folder): diffusers cannot build the tiny ComfyUI-sized DiT, so both use
    weights.diffusers_compatible. ZImagePipeline is built from components."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    from zimage_nodes.testing import weights
    folder = tmp_path_factory.mktemp("twin") / "transformer"
    weights.write_dit(comfy.base_dir / "models" / "diffusion_models" / TWIN_DIT,
                      weights.diffusers_compatible(weights.TINY.dit), seed=3, diffusers_dir=folder)
    dfolder = comfy.base_dir / "models" / "diffusers" / "Z-Image-Turbo"
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=AutoencoderKL.from_pretrained(dfolder / "vae"),
        text_encoder=Qwen3Model.from_pretrained(dfolder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(dfolder / "tokenizer"),
        transformer=ZImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_turbo_9_steps_matches_diffusers_pipeline_8_steps(comfy, diffusers_twin):
    from comfy.sample import prepare_noise
    run_ok(comfy, graph(seed=7, dit=TWIN_DIT))
    ours = output(comfy, "3")["samples"]  # raw VAE space
    cond = output(comfy, "2").embeds
    assert report(comfy).startswith("8 DiT forwards, sigmas [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]")
    noise = prepare_noise(torch.zeros(1, 16, SIZE // 8, SIZE // 8), 7)
    with torch.inference_mode():
        ref = diffusers_twin(prompt_embeds=[cond[0]], latents=noise, height=SIZE, width=SIZE, num_inference_steps=8,
                             guidance_scale=0.0, output_type="latent").images
    ref = vae_mod.model_to_raw(ref)  # diffusers returns model space; it decodes latents / 0.3611 + 0.1159
    assert torch.isfinite(ref).all() and ref.abs().max() > 1
    assert rel_err(ours, ref) < 2e-5  # measured ~4e-6 (fp32; bf16 in tests/unit/test_sampling.py: ~4e-3)


@pytest.fixture(scope="module")
def native_model(comfy, tiny_models):
    """ComfyUI's own Z-Image model (NextDiT) on our tiny DiT file: model detection insists on dim 3840, so the
    supported-model class gets the tiny config explicitly; then ModelSamplingAuraFlow(shift 3) as in the
    official template."""
    import comfy.model_management as mm
    import comfy.model_patcher as model_patcher
    import comfy.supported_models as supported_models
    import comfy.utils as comfy_utils
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    sd = comfy_utils.load_torch_file(str(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors"))
    config = supported_models.ZImage({
        "image_model": "lumina2", "dim": 256, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 2,
        "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32, "qk_norm": True,
        "cap_feat_dim": 64, "patch_size": 2, "in_channels": 16})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    patcher = model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return ModelSamplingAuraFlow().patch_aura(patcher, 3.0)[0]


def test_comfy_simple_matches_native_ksampler(comfy, native_model):
    """ComfyUI's CPU attention (sub-quadratic) differs from SDPA by ~1e-6 per forward (tests/unit/test_dit.py
    patches it to SDPA for bit-equality of one forward); over 9 steps the Euler arithmetic dominates either way
    (measured ~5e-6 with both attentions)."""
    import nodes
    run_ok(comfy, graph(seed=7, schedule="comfy_simple"))
    ours = output(comfy, "3")["samples"]
    cond = output(comfy, "2").embeds
    assert report(comfy).startswith("9 DiT forwards")

    def native() -> torch.Tensor:  # core KSampler's own function, ConditioningZeroOut-style negative
        empty = {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}
        with torch.inference_mode():
            return nodes.common_ksampler(native_model, 7, 9, 1.0, "euler", "simple", [[cond, {}]],
                                         [[torch.zeros_like(cond), {}]], empty)[0]["samples"]

    ref = native()
    assert torch.isfinite(ref).all() and ref.abs().max() > 1
    assert rel_err(ours, ref) < 2e-5  # measured ~5e-6


def test_same_seed_same_image_and_different_seeds_differ(comfy):
    run_ok(comfy, graph(seed=11, steps=FAST))
    image, latent = output(comfy, "3", 1), output(comfy, "3")["samples"]
    run_ok(comfy, graph(seed=11, steps=FAST, max_batch=1))  # an unrelated input changed: the sampler runs again
    assert torch.equal(output(comfy, "3", 1), image) and torch.equal(output(comfy, "3")["samples"], latent)
    run_ok(comfy, graph(seed=12, steps=FAST))
    assert (output(comfy, "3", 1) - image).abs().mean() > 1e-3
    assert image.shape == (1, SIZE, SIZE, 3) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1


def test_latent_through_core_vae_decode_equals_our_image(comfy):
    """Our LATENT is core's: core VAELoader + VAEDecode of it gives our IMAGE (full-size Flux VAE, the only
    size core's VAELoader builds)."""
    from zimage_nodes.testing import weights
    path = comfy.base_dir / "models" / "vae" / FULL_VAE
    if not path.exists():
        weights.write_vae(path, "full", seed=1, dtype=torch.float32)
    prompt = graph(seed=13, vae=FULL_VAE, steps=2)
    prompt["7"] = {"class_type": "VAELoader", "inputs": {"vae_name": FULL_VAE}}
    prompt["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["7", 0]}}
    prompt["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    run_ok(comfy, prompt)
    ours, core = output(comfy, "3", 1), output(comfy, "8")
    assert ours.shape == core.shape == (1, SIZE, SIZE, 3)
    assert ours.std() > 0.01
    assert (ours - core).abs().max() <= 1 / 255


# ---------------------------------------------------------------- progress, previews, interruption

def test_one_progress_update_per_dit_forward_with_previews(comfy, monkeypatch):
    """Previews follow ComfyUI's preview method, like core samplers: none by default (0.3.75), one per step
    when it is on (--preview-method, or the per-prompt choice newer frontends send)."""
    from comfy.cli_args import LatentPreviewMethod, args
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    with progress_events() as events:
        run_ok(comfy, graph(seed=16, steps=4))
    steps = sampler_events(events)
    assert [(v, t) for v, t, _ in steps] == [(i, 3) for i in range(1, 4)]  # turbo steps=4: 3 DiT forwards
    for _, _, preview in steps:
        fmt, pil, max_size = preview
        assert fmt == "JPEG" and pil.size == (SIZE // 8, SIZE // 8) and max_size > 0


def test_interrupt_stops_within_one_step_and_the_next_prompt_is_clean(comfy):
    run_ok(comfy, graph(seed=21, steps=4, max_batch=1))
    never_interrupted = output(comfy, "3", 1)
    with progress_events(interrupt_at=("3", 2)) as events:
        result = comfy.run(graph(seed=21, steps=4))
    assert result.interrupted and not result.success and result.error is None
    assert [v for v, _, _ in sampler_events(events)] == [1, 2]  # nothing after the step it was cancelled at
    with progress_events() as events:
        run_ok(comfy, graph(seed=21, steps=4))
    steps = sampler_events(events)
    assert [(v, t) for v, t, _ in steps] == [(i, 3) for i in range(1, 4)]
    assert all(p is None for _, _, p in steps)  # ComfyUI's default preview method is "none": no previews
    assert torch.equal(output(comfy, "3", 1), never_interrupted)


# ---------------------------------------------------------------- CFG, batching, image-to-image

def test_cfg_runs_the_negative_batched_or_separately(comfy):
    """Same token count: one DiT call of batch 2 per step; different counts: two calls (the call pattern is
    checked in tests/unit/test_sampling.py)."""
    run_ok(comfy, graph(seed=31, steps=FAST, cfg=1.0, negative="blurry"))
    assert "cfg is 1, so the negative prompt is not used" in report(comfy)
    plain = output(comfy, "3")["samples"]
    for negative, how in [("a blue cat sitting in wet grass", "batched with the positive"),
                          ("blurry", "as a second DiT call per step")]:
        run_ok(comfy, graph(seed=31, steps=FAST, cfg=3.0, negative=negative))
        same_length = output(comfy, "2").tokens == output(comfy, "5").tokens
        assert same_length == (how == "batched with the positive"), "pick a negative of the intended length"
        assert f"cfg 3: the negative prompt runs {how}" in report(comfy)
        assert (output(comfy, "3")["samples"] - plain).abs().mean() > 1e-2


def test_batch_chunks_give_the_same_images(comfy):
    run_ok(comfy, graph(seed=41, steps=FAST, batch_size=2))
    whole = output(comfy, "3", 1)
    run_ok(comfy, graph(seed=41, steps=FAST, batch_size=2, max_batch=1))
    assert whole.shape == (2, SIZE, SIZE, 3)
    assert (output(comfy, "3", 1) - whole).abs().max() < 1e-4
    assert (whole[0] - whole[1]).abs().mean() > 1e-3  # two different noises
    run_ok(comfy, graph(seed=41, steps=FAST))  # core noise: the first of a batch is the batch-of-one noise
    assert (output(comfy, "3", 1)[0] - whole[0]).abs().max() < 1e-4


def _img2img(comfy, denoise, source: str = "latent", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler "3" makes an image; sampler "6" refines its LATENT (or IMAGE). Returns (input raw latent,
    refined raw latent)."""
    prompt = graph(seed=51, steps=FAST)
    prompt["6"] = {"class_type": "ZImageSampler", "inputs": {
        **prompt["3"]["inputs"], "seed": 52, "denoise": denoise,
        **({"latent": ["3", 0]} if source == "latent" else {"image": ["3", 1]}), **kw}}
    prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}}
    run_ok(comfy, prompt)
    return output(comfy, "3")["samples"], output(comfy, "6")["samples"]


def change(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().mean() / ref.abs().mean()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_image_to_image_from_a_latent_or_an_image(comfy):
    source, same = _img2img(comfy, 0.0)
    assert torch.equal(same, source)  # denoise 0: the input latent, unchanged
    assert "denoise 0" in output(comfy, "6", 2)
    _, refined = _img2img(comfy, 0.3)
    assert output(comfy, "6", 2).startswith("2 DiT forwards, sigmas [0.")  # the tail of the schedule
    _, redrawn = _img2img(comfy, 1.0)  # starts from pure noise: the same for a latent or an image input
    # random weights: a full redraw is uncorrelated with the input; denoise 0.3 keeps much of it
    # (measured: change 0.78 vs 1.45 of the input's mean magnitude, cosine 0.65 vs 0.00)
    assert 0.1 < change(refined, source) < 0.75 * change(redrawn, source)
    assert cosine(refined, source) > 0.5 > 0.2 > cosine(redrawn, source)

    _, encoded = _img2img(comfy, 0.0, source="image")  # the IMAGE input goes through the loader's VAE
    model, image = output(comfy, "1"), output(comfy, "3", 1)
    with torch.inference_mode():
        assert torch.equal(encoded, model.vae.encode(image).float())
    _, refined = _img2img(comfy, 0.3, source="image")
    assert refined.shape == encoded.shape
    # the tiny VAE's latents are small next to what random DiT weights produce, so compare with a full redraw
    # (measured: change 3.5 vs 5.9 of the input's magnitude, cosine 0.13 vs -0.01)
    assert 0.1 < change(refined, encoded) < 0.75 * change(redrawn, encoded)
    assert cosine(refined, encoded) > cosine(redrawn, encoded) + 0.08


# ---------------------------------------------------------------- bad inputs

def _error(comfy, prompt: dict) -> str:
    result = comfy.run(prompt)
    assert not result.success and result.error is not None
    assert result.error["node_type"] == "ZImageSampler"
    return result.error["exception_message"]


@pytest.mark.parametrize("inputs,expect", [
    ({"width": 128}, ["`width` = 128", "256..2048", "Fix:"]),
    ({"height": 4096}, ["`height` = 4096", "Tiled Upscale"]),
    ({"steps": 0}, ["`steps` = 0", "Expected:", "set steps to 9"]),
    ({"steps": 1}, ["`steps` = 1", "turbo"]),
])
def test_bad_sampler_inputs_are_named_with_the_fix(comfy, inputs, expect):
    message = _error(comfy, graph(seed=61, **{"steps": 2, **inputs}))
    for part in expect:
        assert part in message, message
    good_prompt_still_runs(comfy, seed=62)


def test_denoise_out_of_range(comfy):
    """A typed-in value: ComfyUI 0.3.75 refuses the prompt before running anything, naming the input and the
    limit. A value arriving through a link skips that check, so the sampler says it."""
    valid, error, _, node_errors = comfy.validate(graph(denoise=1.5))
    assert not valid
    problem = node_errors["3"]["errors"][0]
    assert problem["type"] == "value_bigger_than_max" and problem["details"] == "denoise"
    assert "1.5" in problem["message"] and "1.0" in problem["message"]
    prompt = graph(seed=63, denoise=["10", 0])
    prompt["10"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 1.5}}
    message = _error(comfy, prompt)
    assert "`denoise` = 1.5" in message and "0 <= denoise <= 1" in message and "Fix:" in message
    good_prompt_still_runs(comfy, seed=64)


def test_sizes_are_snapped_to_multiples_of_16_with_a_note(comfy):
    result = run_ok(comfy, graph(seed=65, width=300, height=270, steps=2))
    assert output(comfy, "3", 1).shape == (1, 256, 288, 3)
    assert output(comfy, "3")["samples"].shape == (1, 16, 32, 36)
    assert "size snapped from 300x270 to 288x256" in report(comfy)
    assert "size snapped" in result.outputs["3"]["text"][0]  # shown on the node too


def test_a_prompt_over_512_tokens_is_truncated_and_said(comfy):
    long_text = " ".join(["fox", "snow", "forest", "light"] * 200)
    result = run_ok(comfy, graph(seed=66, text=long_text, steps=2))
    assert output(comfy, "2").tokens == 512 and output(comfy, "2").truncated
    assert "truncated" in result.outputs["2"]["text"][0]
    assert "the positive prompt was truncated to 512 tokens" in report(comfy)


@pytest.fixture(scope="module")
def overflow_dit(comfy, tiny_models):
    """A DiT file whose weights overflow float32: one huge layer (as a damaged download might have)."""
    sd = safetensors.torch.load_file(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors")
    sd["x_embedder.weight"] = sd["x_embedder.weight"] * 1e38
    safetensors.torch.save_file(sd, comfy.base_dir / "models" / "diffusion_models" / OVERFLOW_DIT)
    return OVERFLOW_DIT


def test_nan_in_the_latent_stops_with_the_dtype_named(comfy, overflow_dit):
    message = _error(comfy, graph(seed=67, dit=overflow_dit, steps=2))
    assert "NaN/inf" in message and "float32" in message and "black image" in message
    assert "dit_dtype" in message and "Fix:" in message
    good_prompt_still_runs(comfy, seed=68)


def test_compile_option_runs_and_matches_eager(comfy, monkeypatch):
    """The compile input reaches core/compile.py: blocks traced by dynamo (backend "eager" here, inductor for
    users) give the eager result; a compiler that fails (standing in for a machine without triton) falls back
    to eager with a note; compile off restores the eager blocks."""
    dit_compile = pack_module("zimage_nodes.core.compile")
    original = dit_compile.enable
    run_ok(comfy, graph(seed=69, steps=2))
    eager = output(comfy, "3")["samples"]
    torch._dynamo.reset()
    monkeypatch.setattr(dit_compile, "enable", lambda dit, **kw: original(dit, backend="eager"))
    run_ok(comfy, graph(seed=69, steps=2, compile="blocks"))
    assert "DiT blocks run through torch.compile" in report(comfy)
    assert rel_err(output(comfy, "3")["samples"], eager) < 1e-5

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working triton installation (test)")

    monkeypatch.setattr(dit_compile, "enable", lambda dit, **kw: original(dit, backend=broken_backend))
    run_ok(comfy, graph(seed=69, steps=2, compile="blocks", max_batch=1))
    assert "torch.compile failed (RuntimeError: no working triton installation (test)); ran without it" \
        in report(comfy)
    assert torch.equal(output(comfy, "3")["samples"], eager)
    run_ok(comfy, graph(seed=70, steps=2))  # the default, auto, is off on the CPU: eager blocks again
    assert not dit_compile.is_enabled(output(comfy, "1").dit)


def test_the_memory_policy_places_the_dit_and_retries_after_out_of_memory(comfy, monkeypatch):
    """On a GPU runtime.sample runs the DiT inside policy_runtime.dit_session for the plan of this request,
    steps one mode down after a CUDA out-of-memory error, and decodes in tiles when the plan says so. Here
    the plan and the session are stand-ins (the first attempt "runs out of memory", the second is the cpu
    mode), so the math runs on the CPU and must equal a plain run."""
    runtime, policy_runtime = pack_module("zimage_nodes.runtime"), pack_module("zimage_nodes.policy_runtime")
    P = pack_module("zimage_nodes.core.policy")
    negative = "a blue cat sitting in wet grass"
    run_ok(comfy, graph(seed=81, steps=FAST, batch_size=2, cfg=2.0, negative=negative))
    plain = output(comfy, "3")["samples"]
    model, positive, neg = output(comfy, "1"), output(comfy, "2"), output(comfy, "5")
    requests, sessions = [], []

    def plan_for(m, req, notes, mode=None, after_oom=False):
        requests.append((req, mode, after_oom))
        return P.Plan(mode or P.Mode.SEQUENTIAL, 8 * 2 ** 30, 0, 0, 1, True, 128, 2 ** 30)

    @contextlib.contextmanager
    def dit_session(m, plan):
        sessions.append(plan.mode)
        if plan.mode is P.Mode.SEQUENTIAL:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        yield None

    monkeypatch.setattr(policy_runtime, "plan_for", plan_for)
    monkeypatch.setattr(policy_runtime, "dit_session", dit_session)
    monkeypatch.setattr(model.dit_patcher, "load_device", torch.device("cuda", 0))  # as on a GPU machine
    latent, images, text = runtime.sample(model, positive, SIZE, SIZE, 81, FAST, "turbo", 3.0, 2.0, 2, 0, 1.0,
                                          negative=neg)
    req = requests[0][0]
    assert (req.width, req.height, req.batch, req.cfg_batch, req.caption_tokens) == \
        (SIZE, SIZE, 2, 2, positive.embeds.shape[1])
    assert [mode for _, mode, _ in requests] == [None, P.Mode.CPU] and sessions == [P.Mode.SEQUENTIAL, P.Mode.CPU]
    assert [after for _, _, after in requests] == [False, True]  # the retry plans with the smaller budget
    assert "attempt 1: mode sequential" in text and "ran out of memory" in text and "attempt 2: mode cpu" in text
    assert torch.equal(latent["samples"], plain)
    assert images.shape == (2, SIZE, SIZE, 3)  # decoded in 128 px tiles, as the plan asked
