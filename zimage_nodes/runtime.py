"""What the nodes do: the core's torch logic joined to ComfyUI through the bridge.

Node classes call one function of this module each. It holds no module-level state: the loaded
model (``ZImageModel``) travels between nodes on a ZIMAGE_MODEL socket and lives in ComfyUI's
output cache, so a second run of the same graph reads no file again.
"""
from __future__ import annotations

import functools
import math
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import comfy_bridge as bridge
from . import policy_runtime
from .core import compile as dit_compile
from .core import graphs as dit_graphs
from .core import policy as P
from .core import loader, sampling, schedule
from .core.attention import auto_backend
from .core import text_encoder as te_mod
from .core import vae as vae_mod
from .core import vram
from .core.errors import InputError, ZImageError

MIN_SIDE, MAX_SIDE = 256, 2048

# ---------------------------------------------------------------- out of memory (one place)

_OOM_INJECTED: set = set()


def _maybe_inject_oom(stage: str) -> None:
    """Test-only: ZIMAGE_TEST_INJECT_OOM="sample,decode,encode,load" makes each listed stage raise a CUDA
    out-of-memory error once per process (so a retry succeeds). Unset (the default) it does nothing."""
    wanted = os.environ.get("ZIMAGE_TEST_INJECT_OOM", "")
    if wanted and stage in {s.strip() for s in wanted.split(",")} and stage not in _OOM_INJECTED:
        _OOM_INJECTED.add(stage)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by ZIMAGE_TEST_INJECT_OOM)")


class ZImageOutOfMemoryError(ZImageError):
    """An out-of-memory error that escaped one of our stages, with core/vram.oom_report's forensic text."""

    def __init__(self, text: str) -> None:
        Exception.__init__(self, text)


def _names_oom(node: str):
    """Decorator: an out-of-memory error escaping the stage becomes ``ZImageOutOfMemoryError``, which names
    ``node``, the error and the fix (core/vram.oom_report)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ZImageOutOfMemoryError:
                raise
            except Exception as exc:
                if not policy_runtime.is_oom(exc):
                    raise
                model = next((a for a in args if isinstance(a, ZImageModel)), None)
                budget, predicted = vram.policy_numbers(getattr(model, "policy", None))
                text = vram.oom_report(node, exc, {}, {}, budget, predicted, None, None)
                bridge.warn(text.replace("\n", "; "))
                _drop_locals(exc)  # the failed stage's tensors go now, not at the next gc
                raise ZImageOutOfMemoryError(text) from exc
        return inner
    return wrap


@dataclass
class ZImageModel:
    """The payload of a ZIMAGE_MODEL socket."""
    plan: loader.LoadPlan
    dit: torch.nn.Module
    dit_patcher: object
    dit_dtypes: tuple[torch.dtype, torch.dtype]
    vae: vae_mod.ZImageVAE
    vae_patcher: object
    te: loader.LazyTextEncoder
    cache: te_mod.EmbeddingCache
    notes: list[str] = field(default_factory=list)
    te_patcher: Optional[object] = None
    tokenizer: Optional[object] = None
    policy: P.Policy = field(default_factory=P.Policy)
    sizes: Optional[P.Sizes] = None

    @property
    def cap_feat_dim(self) -> int:
        return self.dit.cap_embedder[1].weight.shape[1]


@dataclass
class ZImageConditioning:
    """The payload of a ZIMAGE_CONDITIONING socket: Qwen3 hidden_states[-2] for one prompt."""
    embeds: torch.Tensor  # [1, L, C] on the intermediate device
    prompt: str
    tokens: int
    truncated: bool
    te_identity: str


# ---------------------------------------------------------------- loading

class _StageProgress:
    """One ComfyUI progress bar over several stages, in tensors streamed; a ``ProgressFn`` per stage.

    Updates are sent when the bar moves by at least 1 % (each also checks for interruption), so a
    full-size load sends about a hundred messages, not one per tensor."""

    def __init__(self, stages: list[int]) -> None:
        self.total = max(1, sum(stages))
        self._bar = bridge.Progress(self.total)
        self._offsets = [sum(stages[:i]) for i in range(len(stages))]
        self._step = max(1, self.total // 100)
        self._sent = 0

    def stage(self, index: int) -> loader.ProgressFn:
        def update(done: int, total: int) -> None:
            value = min(self.total, self._offsets[index] + done)
            if value - self._sent >= self._step or done == total:
                self._sent = value
                self._bar.update(value)
        return update

    def finish(self) -> None:
        if self._sent != self.total:
            self._sent = self.total
            self._bar.update(self.total)


@_names_oom("Z-Image Loader (staged)")
def load_model(dit_name: str, text_encoder_name: str, vae_name: str, diffusers_folder: str,
               dit_device: str, dit_dtype: str, te_device: str, te_dtype: str,
               vae_device: str, vae_dtype: str, embedding_cache_dir: str = "",
               policy: Optional[P.Policy] = None) -> tuple[ZImageModel, str]:
    """Stage 1 reads and checks every header and the tokenizer; then the DiT and the VAE stream to their
    devices (one progress bar, in tensors) and each is handed to ComfyUI's model management as it lands.
    The text encoder is planned here and streamed on first use (``encode_text``)."""
    if diffusers_folder and diffusers_folder != bridge.NONE:
        plan = loader.plan_diffusers_folder(bridge.resolve_diffusers_folder(diffusers_folder, "diffusers_folder"),
                                            bridge.comfy_tokenizer_dir())
    else:
        plan = loader.plan_single_files(bridge.resolve_file(bridge.DIT_FOLDER, dit_name, "dit_name"),
                                        bridge.resolve_file(bridge.TE_FOLDER, text_encoder_name, "text_encoder_name"),
                                        bridge.resolve_file(bridge.VAE_FOLDER, vae_name, "vae_name"),
                                        bridge.comfy_tokenizer_dir())
    tokenizer = loader.load_tokenizer(plan)
    _maybe_inject_oom("load")
    notes = list(plan.notes)
    # every choice is checked before anything is allocated
    dev = bridge.resolve_device(dit_device, bridge.torch_device(), "dit_device")
    vdev = bridge.resolve_device(vae_device, bridge.vae_device(), "vae_device")
    tdev = bridge.resolve_device(te_device, bridge.text_encoder_device(), "te_device")
    pol = policy_runtime.flags_policy(policy)
    notes.extend(pol.notes)
    dit_dtype = policy_runtime.storage_override(pol, dit_dtype, notes)
    dit_storage, dit_compute = loader.choose_dtypes(dit_dtype, dev, "DiT", "dit_dtype", notes)
    vae_storage, _ = loader.choose_dtypes(vae_dtype, vdev, "vae", "vae_dtype", notes)
    te_storage, te_compute = loader.choose_dtypes(te_dtype, tdev, "text encoder", "te_dtype", notes)
    cache = te_mod.EmbeddingCache(directory=_cache_dir(embedding_cache_dir))
    sizes = policy_runtime.sizes_for(plan, dit_storage, te_storage, vae_storage)
    dit_home = policy_runtime.load_device_for_dit(pol, sizes, dev, notes)  # host memory when it will stream

    progress = _StageProgress([len(plan.dit.shapes), len(plan.vae.shapes)])
    dit = dit_patcher = vae = vae_patcher = None
    try:
        _make_room(loader.resident_bytes(plan.dit, dit_storage, dit_compute), dit_home)
        dit = loader.load_dit(plan.dit, dit_home, dit_storage, dit_compute, progress=progress.stage(0))
        dit_patcher = bridge.make_patcher(dit, dev, dit_home)
        if dit_home == dev:
            bridge.register_loaded(dit_patcher)
        run_dev = torch.device("cpu") if pol.mode is P.Mode.CPU else dev  # where the DiT computes
        backend = pol.attention if pol.attention != "auto" else auto_backend(run_dev)
        if backend != "sdpa":
            reason = dit.set_attention_backend(backend)
            if reason:
                notes.append(reason)
            elif pol.attention == "auto":
                notes.append(f"attention: {backend} (auto: FlashAttention-3 is installed and this is a Hopper GPU)")
        weights_note = policy_runtime.prepare_dit_weights(  # fp8: scales, and fp8 matmuls for fp8_fast
            dit, pol, dit_storage, dit_compute, run_dev)
        if weights_note:
            notes.append(weights_note)

        _make_room(loader.resident_bytes(plan.vae, vae_storage, vae_storage), vdev)
        vae = loader.load_vae(plan.vae, vdev, vae_storage, progress=progress.stage(1))
        vae_patcher = bridge.make_patcher(vae.model, vdev, vdev)
        bridge.register_loaded(vae_patcher)
        progress.finish()
    except BaseException as e:  # failed or cancelled (interrupt) mid-load: release what was streamed now
        bridge.forget([dit_patcher, vae_patcher])
        dit = dit_patcher = vae = vae_patcher = None
        _drop_locals(e)
        raise

    te = loader.LazyTextEncoder(plan.text_encoder, tdev, te_storage, te_compute)
    model = ZImageModel(plan, dit, dit_patcher, (dit_storage, dit_compute), vae, vae_patcher, te, cache, notes,
                        tokenizer=tokenizer, policy=pol, sizes=sizes)
    where = str(dev) if dit_home == dev else f"host memory (its blocks stream to {dev} while sampling)"
    report = [f"Memory policy: {pol.mode.value}" + (f", budget {pol.budget_gb:g} GB" if pol.budget_gb else ""),
              f"DiT: {_files(plan.dit)} ({plan.dit.layout}) in {where}, "
              f"{_name(dit_storage)} storage / {_name(dit_compute)} compute",
              f"VAE: {_files(plan.vae)} on {vdev}, {_name(vae_storage)}",
              f"Text encoder: {_files(plan.text_encoder)} on {tdev}, {_name(te_storage)} storage / "
              f"{_name(te_compute)} compute, loaded on first use (last layer and final norm skipped)",
              "Tokenizer: " + ("the folder's tokenizer/" if plan.own_tokenizer else "ComfyUI's Qwen tokenizer files")]
    if cache.directory is not None:
        report.append(f"Embedding cache on disk: {cache.directory}")
    text = "\n".join(report + notes)
    bridge.info(text.replace("\n", "; "))
    return model, text


def _files(source: loader.Source) -> str:
    if source.layout == "single":
        return source.headers[0].path.name
    return f"{source.headers[0].path.parent.name}/ ({len(source.headers)} file{'s' * (len(source.headers) > 1)})"


def _cache_dir(text: str) -> Optional[Path]:
    """The embedding cache's folder (created now, so that a path that cannot be written fails here)."""
    if not text.strip():
        return None
    folder = Path(text.strip()).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".zimage_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"`embedding_cache_dir`: cannot write to {folder}.", found=f"{e.strerror or e}",
                         expected="a folder this user can create and write, or empty for a memory-only cache",
                         fix="choose another folder (e.g. inside ComfyUI's user or temp folder) or leave it "
                             "empty") from e
    return folder


def _drop_locals(error: BaseException) -> None:
    """Clear the local variables of the finished frames in ``error``'s traceback (a half-built model in
    the loader's frames). ComfyUI keeps the exception, and through it the frames, in a reference cycle
    until the garbage collector runs; without this a cancelled 12 GB load would hold its memory until
    then, and a retry could run out of it. Formatting the traceback needs no locals."""
    traceback.clear_frames(error.__traceback__)


def _make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to free this much on a GPU before we stream a component there (it offloads other
    models; ComfyUI does not manage host memory, so nothing is asked for the CPU)."""
    if device.type != "cpu":
        bridge.free_memory(nbytes, device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- text encoding

@_names_oom("Z-Image Text Encode")
def encode_text(model: ZImageModel, text: str) -> tuple[ZImageConditioning, str]:
    """Prompt embedding from the cache, else from the text encoder, streamed to its device on first use
    (a progress bar in tensors) and handed to ComfyUI's model management."""
    ids, truncated = te_mod.tokenize(model.tokenizer, text)
    identity = model.te.identity
    embeds = model.cache.get(text, identity)
    note = "embedding cache hit"
    if embeds is None:
        plan_notes: list[str] = []
        plan = policy_runtime.plan_for(model, P.Request(1024, 1024, caption_tokens=len(ids)), plan_notes)
        streamed = plan.mode in policy_runtime.STREAMED_MODES and model.te.device.type == "cuda"
        if model.te.module is None:
            home = torch.device("cpu") if streamed else model.te.device
            progress = _StageProgress([model.te.n_tensors])
            _make_room(model.te.nbytes, home)
            try:
                module = model.te.get(progress=progress.stage(0), device=home)
            except BaseException as e:  # failed or cancelled mid-load: release the half-built encoder now
                _drop_locals(e)
                raise
            progress.finish()
            model.te_patcher = bridge.make_patcher(module, model.te.device, home)
            if home == model.te.device:
                bridge.register_loaded(model.te_patcher)
            note = "text encoder loaded, encoded"
        else:
            module = model.te.module
            note = "encoded"
        if streamed:
            note += f" (blocks streamed: {plan.describe()})"
        bridge.check_interrupt()
        _maybe_inject_oom("encode")
        with policy_runtime.te_session(model, plan) as device, torch.inference_mode():
            out = module(torch.tensor([ids], device=device))
        embeds = out.to(bridge.intermediate_device(), torch.float32)
        model.cache.put(text, identity, embeds)
    msg = f"{len(ids)} tokens, {note}"
    if truncated:
        msg += f"; the prompt was longer than {te_mod.MAX_TOKENS} tokens and was truncated"
        bridge.warn(msg)
    return ZImageConditioning(embeds, text, len(ids), truncated, identity), msg


# ---------------------------------------------------------------- sampling

COMPILE_CHOICES = ("off", "blocks", "auto")  # permanent: saved workflows store these
GRAPHS_ENV = "ZIMAGE_CUDA_GRAPHS"  # 1: auto replays CUDA graphs (core/graphs.py); opt-in until measured on a GPU


def snap_size(width: int, height: int, notes: list[str]) -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        if v < MIN_SIDE or v > MAX_SIDE:
            raise InputError(f"`{name}` = {v} is outside {MIN_SIDE}..{MAX_SIDE}.",
                             expected=f"{MIN_SIDE} <= {name} <= {MAX_SIDE}, a multiple of 16",
                             fix=("for larger images generate at up to 2048 and use the Z-Image Tiled Upscale "
                                  "node" if v > MAX_SIDE else f"use at least {MIN_SIDE}"))
    w, h = width // 16 * 16, height // 16 * 16
    if (w, h) != (width, height):
        notes.append(f"size snapped from {width}x{height} to {w}x{h} (multiples of 16)")
    return w, h


def _check_conditioning(model: ZImageModel, cond: ZImageConditioning, name: str) -> None:
    if cond.embeds.shape[-1] != model.cap_feat_dim:
        raise InputError(f"`{name}` was encoded by a text encoder of width {cond.embeds.shape[-1]}, "
                         f"but this DiT expects {model.cap_feat_dim}.",
                         fix="encode the prompt with the Z-Image Text Encode node fed by the same loader")


def _check_numbers(batch_size: int, max_batch: int, cfg: float) -> None:
    if batch_size < 1:
        raise InputError(f"`batch_size` = {batch_size}.", expected="batch_size >= 1", fix="set batch_size to 1")
    if max_batch < 0:
        raise InputError(f"`max_batch` = {max_batch}.", expected="0 (the whole batch at once) or more",
                         fix="set max_batch to 0")
    if not math.isfinite(cfg) or cfg <= 0:
        raise InputError(f"`cfg` = {cfg}.", expected="a positive number (1 = no guidance, as Turbo is meant to run)",
                         fix="set cfg to 1")


def _start_latent(model: ZImageModel, latent: Optional[dict], image: Optional[torch.Tensor],
                  batch_size: int, notes: list[str]) -> Optional[torch.Tensor]:
    """The raw latent to refine (float32, on the intermediate device), or None for text-to-image."""
    if latent is None and image is None:
        return None
    if latent is not None:
        if image is not None:
            notes.append("both latent and image were connected; the latent is used")
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            raise InputError("`latent` is not a LATENT.", expected='a LATENT ({"samples": tensor})',
                             fix="connect a LATENT output (e.g. VAE Encode or another sampler)")
        raw, name = latent["samples"], "latent"
        ignored = sorted(k for k in ("noise_mask", "batch_index") if k in latent)
        if ignored:
            notes.append(f"the latent's {' and '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored "
                         "(this sampler refines the whole latent)")
    else:
        raw, name = encode_image(model, image, notes), "image"
    if raw.ndim != 4 or raw.shape[1] != vae_mod.LATENT_CHANNELS:
        raise InputError(f"`latent` has shape {tuple(raw.shape)}.",
                         expected="[B, 16, H/8, W/8] (a Flux/Z-Image latent)",
                         fix="encode the image with this loader's VAE (connect the IMAGE input instead)")
    for side, v in (("height", raw.shape[2] * 8), ("width", raw.shape[3] * 8)):
        if v < 16 or v > MAX_SIDE:
            raise InputError(f"`{name}` is {v} px in {side}, outside 16..{MAX_SIDE}.",
                             expected=f"an input of at most {MAX_SIDE}x{MAX_SIDE} px",
                             fix="refine larger images with the Z-Image Tiled Upscale node")
    if batch_size > 1 and batch_size != raw.shape[0]:
        notes.append(f"batch_size {batch_size} is ignored: the {name} input holds {raw.shape[0]} image(s)")
    return raw.detach().to(bridge.intermediate_device(), torch.float32)


def graphs_allowed(compile_mode: str, dev: torch.device, plan: Optional[P.Plan], req: P.Request,
                   compiled: bool, forwards: int) -> bool:
    """Whether the sampler replays its forwards from a CUDA graph (core/graphs.py): opted in with
    ZIMAGE_CUDA_GRAPHS=1, compile "auto" with the blocks compiled, a CUDA device, more than two forwards, and a
    plan with the DiT resident and room for the graph's activations (``policy.graph_headroom``)."""
    value = os.environ.get(GRAPHS_ENV, "").strip().lower()
    if value not in ("", "1", "on", "true", "yes", "0", "off", "false", "no"):
        bridge.warn(f"{GRAPHS_ENV}={value!r} is not understood; CUDA graphs stay off (set it to 1 to use them)")
    return (value in ("1", "on", "true", "yes")
            and compile_mode == "auto" and compiled and dev.type == "cuda" and forwards > 2
            and plan is not None and P.graph_headroom(plan, req))


def _check_compile_mode(compile_mode: str) -> None:
    if compile_mode not in COMPILE_CHOICES:
        raise InputError(f"`compile` = {compile_mode!r}.", expected=" or ".join(COMPILE_CHOICES), fix="choose auto")


def _auto_compile(dev: torch.device, plan: Optional[P.Plan]) -> bool:
    """``auto``: compile when the DiT runs resident on an NVIDIA GPU with triton installed (streamed
    modes are bound by host-to-device copies, and the CPU would need a C++ toolchain)."""
    import importlib.util
    return (dev.type == "cuda" and (plan is None or plan.mode not in policy_runtime.STREAMED_MODES)
            and importlib.util.find_spec("triton") is not None)


def _use_compile(model: ZImageModel, compile_mode: str, dev: torch.device, plan: Optional[P.Plan],
                 notes: list[str]) -> None:
    """Compile the DiT's blocks for this run or not, as ``compile_mode`` says (core/compile.py)."""
    if compile_mode == "blocks" or (compile_mode == "auto" and _auto_compile(dev, plan)):
        dit_compile.enable(model.dit)
        note = ("DiT blocks run through torch.compile (token dimension dynamic: one compile per block kind "
                "and batch size, the first run compiles)")
    else:
        dit_compile.disable(model.dit)
        note = None
    notes[:] = [n for n in notes if not n.startswith("DiT blocks run through torch.compile")]
    if note:
        notes.append(note)


@_names_oom("Z-Image Sampler (Turbo)")
def sample(model: ZImageModel, positive: ZImageConditioning, width: int, height: int, seed: int, steps: int,
           schedule_name: str, shift: float, cfg: float, batch_size: int, max_batch: int, denoise: float,
           negative: Optional[ZImageConditioning] = None, latent: Optional[dict] = None,
           image: Optional[torch.Tensor] = None, *, compile_mode: str = "auto") -> tuple[dict, torch.Tensor, str]:
    """Sample and decode. Returns (core LATENT in raw VAE space, IMAGE, report).

    Text-to-image draws ``batch_size`` noises of ``width`` x ``height`` (snapped to multiples of 16)
    exactly as core KSampler does for ``seed``; with a ``latent`` (or ``image``, encoded by the
    loader's VAE) it refines that instead, keeping the tail of the schedule as core KSampler's
    ``denoise`` does (0 returns the input unchanged). ``compile_mode`` "blocks" runs the DiT blocks
    through torch.compile (core/compile.py), "auto" does so when the DiT runs resident on a CUDA GPU
    with triton; a failing compilation falls back to eager."""
    notes: list[str] = []
    _check_conditioning(model, positive, "positive")
    if negative is not None:
        _check_conditioning(model, negative, "negative")
    _check_numbers(batch_size, max_batch, cfg)
    _check_compile_mode(compile_mode)
    sigmas = schedule.make_sigmas(schedule_name, steps, shift, denoise)
    raw_in = _start_latent(model, latent, image, batch_size, notes)
    if raw_in is None:
        if denoise == 0.0:
            raise InputError("`denoise` = 0 leaves nothing to do without a `latent` or `image` input.",
                             expected="denoise > 0 for text-to-image (1 = full denoise)",
                             fix="set denoise to 1, or connect the latent/image to refine")
        w, h = snap_size(width, height, notes)
        shape = (batch_size, vae_mod.LATENT_CHANNELS, h // 8, w // 8)
        if denoise < 1.0:
            notes.append("denoise < 1 without a latent or image input starts from noise (as core KSampler does)")
    else:
        shape = tuple(raw_in.shape)
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is not None and cond.truncated and (name == "positive" or cfg != 1.0):
            notes.append(f"the {name} prompt was truncated to {te_mod.MAX_TOKENS} tokens")
    n = len(sigmas) - 1
    if n == 0:  # denoise 0: nothing to do, the input goes out as it came in
        notes.insert(0, "denoise 0: no DiT forward; the input latent is returned unchanged")
        return {"samples": raw_in.clone()}, decode(model, raw_in), "\n".join(notes)

    compute = model.dit_dtypes[1]
    noise = bridge.prepare_noise(shape, seed)
    x_init = vae_mod.raw_to_model(raw_in) if raw_in is not None else None
    uncond = negative if negative is not None and cfg != 1.0 else None
    if negative is not None and cfg == 1.0:
        notes.append("cfg is 1, so the negative prompt is not used (Turbo needs no CFG)")
    elif negative is None and cfg != 1.0:
        notes.append(f"cfg is {cfg:g} but no negative is connected: guidance is off")
    batched_cfg = uncond is not None and uncond.embeds.shape[1] == positive.embeds.shape[1]
    if uncond is not None:
        how = "batched with the positive" if batched_cfg else "as a second DiT call per step"
        notes.append(f"cfg {cfg:g}: the negative prompt runs {how}")
    clear_every = int(getattr(getattr(model, "policy", None), "cache_clear_interval", 0) or 0)

    def run(dev: torch.device, plan: Optional[P.Plan]) -> torch.Tensor:
        # previews follow ComfyUI's preview method (off by default in 0.3.75), one per step when on;
        # a preview is the only thing in the loop that reads the device (one small copy per step)
        _maybe_inject_oom("sample")  # inside the attempt run under policy_runtime.run_with_fallback
        previewer = bridge.live_previewer(dev)
        progress = bridge.Progress(n)

        def on_step(step: sampling.Step) -> None:
            progress.update(step.index + 1, previewer(step.x0) if previewer is not None else None)
            bridge.check_interrupt()
            if clear_every and (step.index + 1) % clear_every == 0:
                bridge.soft_empty_cache()

        def forward(x: torch.Tensor, s: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
            return model.dit(x, s, cap)

        use_graphs = graphs_allowed(compile_mode, dev, plan, req, dit_compile.is_enabled(model.dit), n)
        graphs = dit_graphs.StepGraphs(forward) if use_graphs else None
        try:
            return sampling.sample(graphs or forward, noise.to(dev), sigmas,
                                   positive.embeds.to(dev, compute), cfg=cfg, max_batch=max_batch, callback=on_step,
                                   uncond=uncond.embeds.to(dev, compute) if uncond is not None else None,
                                   x_init=x_init.to(dev) if x_init is not None else None)
        finally:
            if graphs is not None:
                graphs.close()
                notes[:] = [m for m in notes if not m.startswith("CUDA graph")]
                notes.append(f"CUDA graph: {graphs.replays} of {n} DiT forwards replayed from one recorded forward"
                             if graphs.error is None else f"CUDA graph not used ({graphs.error})")

    def run_eager_if_compile_fails(dev: torch.device, plan: Optional[P.Plan]) -> torch.Tensor:
        _use_compile(model, compile_mode, dev, plan, notes)
        try:
            return run(dev, plan)
        except Exception as exc:  # only a failing torch.compile is retried (eagerly); everything else propagates
            if not (dit_compile.is_enabled(model.dit) and dit_compile.is_compile_error(exc)):
                raise
            dit_compile.disable(model.dit)
            msg = f"torch.compile failed ({dit_compile.describe_error(exc)}); ran without it"
            bridge.warn(msg)
            notes.append(msg)
            return run(dev, plan)

    req = P.Request(shape[3] * 8, shape[2] * 8, batch=shape[0], cfg_batch=2 if batched_cfg else 1,
                    caption_tokens=max(positive.embeds.shape[1], uncond.embeds.shape[1] if uncond is not None else 0))
    with torch.inference_mode():
        x0, plan, dev = _with_dit(model, req, notes, run_eager_if_compile_fails)
        sampling.check_finite(x0, f"the DiT computing in {_name(compute)} (weights stored as "
                                  f"{_name(model.dit_dtypes[0])}) on {dev}; the sampler stops here rather "
                                  "than decode them into a black image")
        raw = vae_mod.model_to_raw(x0)
    images = decode(model, raw, tile_px=plan.vae_tile if plan is not None and plan.vae_tiled else 0)
    notes.insert(0, f"{n} DiT forwards, sigmas {[round(float(s), 4) for s in sigmas]}")
    return {"samples": raw.to(bridge.intermediate_device(), torch.float32)}, images, "\n".join(notes)


def _with_dit(model: ZImageModel, req: P.Request, notes: list[str], body):
    """``body(device, plan)`` with the DiT placed as the model's memory policy plans for ``req``
    (policy_runtime.dit_session: resident, offloaded, block-streamed or on the CPU), stepping one mode
    down and retrying once on CUDA out-of-memory when the policy allows. Returns (result, plan, device);
    the plan is None when the DiT's device is not a GPU (as te_session does) or the model was built without
    the policy's sizes: then the DiT is simply loaded on its device through ComfyUI's model management."""
    if getattr(model, "sizes", None) is None or model.dit_patcher.load_device.type != "cuda":
        bridge.load_on_device([model.dit_patcher])
        return body(model.dit_patcher.load_device, None), None, model.dit_patcher.load_device
    used: list = []

    def attempt(plan: P.Plan):
        dev = torch.device("cpu") if plan.mode is P.Mode.CPU else model.dit_patcher.load_device
        used[:] = [plan, dev]
        with policy_runtime.dit_session(model, plan):
            return body(dev, plan)

    first = policy_runtime.plan_for(model, req, notes)
    out = policy_runtime.run_with_fallback(model.policy, first, attempt,
                                           lambda mode: policy_runtime.plan_for(model, req, notes, mode,
                                                                                after_oom=True), notes)
    return out, used[0], used[1]


def decode(model: ZImageModel, raw: torch.Tensor, tile_px: int = 0) -> torch.Tensor:
    """Raw latent -> IMAGE [B, H, W, 3] float32 on the intermediate device, with the loader's VAE
    (in tiles of ``tile_px`` pixels, 64 px overlap, when the memory plan asks for it)."""
    _maybe_inject_oom("decode")
    bridge.load_on_device([model.vae_patcher])
    with torch.inference_mode():
        if tile_px and max(raw.shape[2:]) * vae_mod.DOWNSCALE > tile_px:
            return model.vae.decode_tiled(raw, tile_px, 64).to(bridge.intermediate_device(), torch.float32)
        return model.vae.decode(raw).to(bridge.intermediate_device(), torch.float32)


def encode_image(model: ZImageModel, image: torch.Tensor, notes: Optional[list[str]] = None) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> raw latent [B, 16, H/8, W/8] float32 with the loader's VAE (the posterior
    mean), centre-cropped to multiples of 8 like core VAE Encode."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3 \
            or image.shape[1] < 8 or image.shape[2] < 8:
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"`image` has shape {found}.", expected="IMAGE [B, H, W, 3], at least 8x8",
                         fix="connect a Load Image or VAE Decode output")
    h, w = image.shape[1] // 8 * 8, image.shape[2] // 8 * 8
    if notes is not None and (h, w) != tuple(image.shape[1:3]):
        notes.append(f"image cropped from {image.shape[2]}x{image.shape[1]} to {w}x{h} (centred, multiples of 8)")
    bridge.load_on_device([model.vae_patcher])
    with torch.inference_mode():
        return model.vae.encode(image).float()
