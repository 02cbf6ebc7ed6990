"""core.ops: fp8 weights with per-tensor scales (quantization, the dequant path, the fp8-matmul path with
per-row activation scales through torch._scaled_mm, which also runs on the CPU in this torch), and the
helpers that convert a loaded model.
The CUDA path against the dequant path is the gpu-marked test at the end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zimage_nodes.core import ops
from zimage_nodes.core.dit import ZImageDiT, dit_config_from_shapes
from zimage_nodes.core.ops import E4M3, CastLinear
from zimage_nodes.core.streaming import BlockStreamer
from zimage_nodes.testing import weights as W

BF16, FP32 = torch.bfloat16, torch.float32
# e4m3: 3 mantissa bits, so rounding is within 2^-4 of the value for normals; subnormals (below 2^-6 in the
# quantized units) are spaced 2^-9, i.e. within 2^-10 of the value
E4M3_REL, E4M3_SUB = 2.0 ** -4, 2.0 ** -10


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def fp8_layer(out_f: int = 512, in_f: int = 256, bias: bool = False, seed: int = 0) -> CastLinear:
    g = torch.Generator().manual_seed(seed)
    lin = CastLinear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
        if bias:
            lin.bias.copy_(0.1 * torch.randn(out_f, generator=g))
    return lin


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """Let fp8_matmul layers use torch._scaled_mm on the CPU, counting the calls."""
    calls = []
    real = torch._scaled_mm

    def counting(*a, **k):
        calls.append(k.get("use_fast_accum"))
        return real(*a, **k)
    monkeypatch.setattr(ops, "FP8_MATMUL_DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(torch, "_scaled_mm", counting)
    return calls


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("magnitude", [1e-4, 0.02, 1.0, 300.0])
def test_per_tensor_scaled_storage_round_trips(magnitude):
    w = magnitude * torch.randn(384, 256, generator=torch.Generator().manual_seed(1))
    q, s = ops.quantize_fp8(w)
    assert q.dtype == E4M3 and q.shape == w.shape
    assert s.dtype == FP32 and s.shape == () and s > 0
    amax = w.abs().max()
    # amax / 448, rounded to a bf16 value (exact in every compute dtype)
    assert torch.allclose(s, amax / 448, rtol=2 ** -8, atol=0)
    assert s.to(BF16).float() == s
    assert q.float().abs().max() >= 416  # the largest entry uses the top of e4m3's range
    err = (q.float() * s - w).abs()
    assert (err <= E4M3_REL * w.abs() + E4M3_SUB * s + 1e-12 * magnitude).all()
    assert rel_l2(q.float() * s, w) < 0.04


def test_tiny_weights_keep_their_precision_thanks_to_the_scale():
    """Weights of magnitude 1e-4 are below e4m3's smallest subnormal (2^-9): a plain cast flushes them to
    zero, the per-tensor scale keeps them within fp8's relative rounding."""
    w = 1e-4 * torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    plain = w.to(E4M3).float()
    q, s = ops.quantize_fp8(w)
    assert (plain == 0).float().mean() > 0.99 and rel_l2(plain, w) > 0.99
    assert rel_l2(q.float() * s, w) < 0.04
    assert (q.float() != 0).float().mean() > 0.99


def test_zero_and_other_fp8_formats():
    q, s = ops.quantize_fp8(torch.zeros(32, 32))
    assert s == 1 and (q.float() == 0).all()
    w = torch.randn(64, 32)
    q5, s5 = ops.quantize_fp8(w, torch.float8_e5m2)
    assert q5.dtype == torch.float8_e5m2 and torch.allclose(s5, w.abs().max() / 57344, rtol=2 ** -8)
    assert rel_l2(q5.float() * s5, w) < 0.08  # e5m2: 2 mantissa bits
    with pytest.raises(ValueError):
        ops.quantize_fp8(w, BF16)


def test_quantizing_in_chunks_equals_at_once(monkeypatch):
    w = torch.randn(100, 70)
    q, s = ops.quantize_fp8(w)
    monkeypatch.setattr(ops, "_QUANT_CHUNK", 333)
    q2, s2 = ops.quantize_fp8(w)
    assert s == s2 and torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


# ---------------------------------------------------------------- the dequant path

@pytest.mark.parametrize("rows", [3, 700])  # output scaled / weight scaled
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_dequant_path_equals_the_dequantized_weight(rows, bias, dtype):
    lin = fp8_layer(bias=bias)
    ops.quantize_linears_fp8(lin)
    assert lin.weight.dtype == E4M3 and lin.weight_scale is not None and not lin.fp8_matmul
    x = torch.randn(rows, 256).to(dtype)
    with torch.inference_mode():
        got = lin(x)
    want = F.linear(x.float(), ops.dequantize(lin), None if lin.bias is None else lin.bias.float())
    assert got.dtype == dtype
    tol = 1e-5 if dtype == FP32 else 2e-2
    assert (got.float() - want).abs().max() <= tol * want.abs().max()
    assert lin.weight.dtype == E4M3  # the stored weight is never modified by a call


def test_a_plain_linear_without_a_scale_is_unchanged():
    lin = fp8_layer(bias=True)
    x = torch.randn(4, 256)
    assert lin.weight_scale is None
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_the_scale_moves_with_the_module_and_stays_out_of_the_state_dict():
    lin = fp8_layer()
    keys = list(lin.state_dict())
    ops.quantize_linears_fp8(lin)
    assert list(lin.state_dict()) == keys  # the checkpoint's names
    assert "weight_scale" in dict(lin.named_buffers())
    lin.to("meta")
    assert lin.weight_scale.device.type == "meta"


# ---------------------------------------------------------------- the fp8-matmul path (on the CPU here)

@pytest.mark.parametrize("bias", [False, True])
def test_fp8_matmul_math(bias):
    """fp8_linear = the quantized activation (one scale per row) times the quantized weight, both scaled
    back, in fp32; and within fp8 rounding of the dequant path."""
    lin = fp8_layer(bias=bias)
    ops.quantize_linears_fp8(lin)
    x = (3 * torch.randn(2, 37, 256)).to(BF16)
    for fast in (False, True):
        y = ops.fp8_linear(x, lin.weight, lin.weight_scale, lin.bias, fast_accum=fast)
        assert y.shape == (2, 37, 512) and y.dtype == BF16
        sx = (x.float().abs().amax(dim=-1, keepdim=True) / 448).clamp_min(1e-12)
        xq = (x.float() / sx).clamp(-448, 448).to(E4M3)
        ref = (xq.float() * sx) @ ops.dequantize(lin).t()
        if bias:
            ref = ref + lin.bias.to(BF16).float()
        assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
        dequant = F.linear(x.float(), ops.dequantize(lin), None if lin.bias is None else lin.bias.float())
        assert rel_l2(y, dequant) < 0.05


def test_fp8_matmul_layers_use_scaled_mm_only_where_it_applies(fp8_on_cpu):
    lin = fp8_layer()
    ops.quantize_linears_fp8(lin)
    lin.fp8_matmul = True
    x = torch.randn(5, 256, dtype=BF16)
    with torch.inference_mode():
        y = lin(x)
        assert fp8_on_cpu == [True]  # fast accumulation
        assert rel_l2(y, F.linear(x.float(), ops.dequantize(lin))) < 0.05
        lin(x.float())  # fp32 input: dequant path
        lin(x[:0])      # no rows
        odd = fp8_layer(out_f=40, in_f=24)  # sizes not multiples of 16
        ops.quantize_linears_fp8(odd)
        odd.fp8_matmul = True
        odd(torch.randn(3, 24, dtype=BF16))
        e5 = fp8_layer()
        q, s = ops.quantize_fp8(e5.weight, torch.float8_e5m2)
        e5.weight = torch.nn.Parameter(q, requires_grad=False)
        ops.set_weight_scale(e5, s)
        e5.fp8_matmul = True
        e5(x)
    assert fp8_on_cpu == [True]


def test_without_the_cpu_switch_the_cpu_takes_the_dequant_path(monkeypatch):
    lin = fp8_layer()
    ops.quantize_linears_fp8(lin, fp8_matmul=False)
    lin.fp8_matmul = True
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("_scaled_mm on the CPU"))
    x = torch.randn(5, 256, dtype=BF16)
    assert rel_l2(lin(x), F.linear(x.float(), ops.dequantize(lin))) < 0.01


@pytest.mark.parametrize("fp8_matmul", [False, True])
@pytest.mark.parametrize("dynamic_tokens", [False, True])
def test_both_paths_compile_without_graph_breaks(fp8_on_cpu, fp8_matmul, dynamic_tokens):
    """fullgraph=True fails on a graph break (a .item() host sync would be one); the token dimension may be
    dynamic (core/compile.py's default)."""
    torch._dynamo.reset()
    lin = fp8_layer(bias=True)
    ops.quantize_linears_fp8(lin)
    lin.fp8_matmul = fp8_matmul
    fn = torch.compile(lin, fullgraph=True, backend="aot_eager", dynamic=None if dynamic_tokens else False)
    with torch.inference_mode():
        for tokens in (9, 33):
            x = torch.randn(2, tokens, 256, dtype=BF16)
            if dynamic_tokens:
                torch._dynamo.maybe_mark_dynamic(x, 1)
            eager = lin(x)
            compiled = fn(x)
            assert compiled.shape == eager.shape
            assert (compiled.float() - eager.float()).abs().max() <= 2e-2 * eager.float().abs().max()
    assert bool(fp8_on_cpu) == fp8_matmul
    torch._dynamo.reset()


# ---------------------------------------------------------------- a model

def tiny_dit(seed: int = 0) -> ZImageDiT:
    spec = W.SCALES["tiny"].dit
    state = {t.name: W.random_tensor(t, seed, "dit", FP32) for t in W.dit_tensors(spec)}
    model = ZImageDiT(dit_config_from_shapes({k: tuple(v.shape) for k, v in state.items()}))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def dit_inputs(dtype=FP32):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 16, 8, 8, generator=g).to(dtype), torch.tensor([0.7]),
            torch.randn(1, 20, 64, generator=g).to(dtype))


def test_quantize_linears_fp8_converts_a_loaded_dit_and_flags_only_the_block_linears(fp8_on_cpu):
    ref = tiny_dit()
    with torch.inference_mode():
        want = ref.to(BF16)(*dit_inputs(BF16))
    model = tiny_dit().to(BF16)  # a loaded bf16 DiT (a later .to(dtype) would cast the fp8 weights too)
    keys = list(model.state_dict())
    n = ops.quantize_linears_fp8(model, fp8_matmul=True)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, CastLinear)}
    assert n == len(linears) and list(model.state_dict()) == keys
    assert all(m.weight.dtype == E4M3 and m.weight_scale is not None for m in linears.values())
    flagged = sorted(name for name, m in linears.items() if m.fp8_matmul)
    per_block = {"attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
    blocks = [f"{g}.{i}" for g in ("noise_refiner", "context_refiner") for i in range(2)] + ["layers.0", "layers.1"]
    assert flagged == sorted(f"{b}.{p}" for b in blocks for p in per_block)
    assert not any(m.fp8_matmul for name, m in linears.items() if "adaLN" in name or "embedder" in name
                   or name.startswith("final_layer"))
    assert ops.quantize_linears_fp8(model) == 0  # already quantized: left alone
    with torch.inference_mode():
        fast = model(*dit_inputs(BF16))
        assert len(fp8_on_cpu) == 5 * len(blocks)  # every flagged linear, once
        ops.set_fp8_matmul(model, False)
        dequant = model(*dit_inputs(BF16))
    assert len(fp8_on_cpu) == 5 * len(blocks)
    # fp8 rounding of the weights (and of the activations on the fp8 path), against bf16 weights
    assert rel_l2(dequant, want) < 0.12 and rel_l2(fast, want) < 0.15
    assert rel_l2(fast, dequant) < 0.1


def test_block_streamer_moves_the_scales_with_the_blocks():
    model = tiny_dit()
    ops.quantize_linears_fp8(model)
    x, sigma, cap = dit_inputs()
    units = list(model.context_refiner) + list(model.noise_refiner) + list(model.layers)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_scale")}
    with torch.inference_mode():
        want = model(x, sigma, cap)
        s = BlockStreamer(units, torch.device("cpu"), resident=1, prefetch=1).install()
        got = model(x, sigma, cap)
        s.remove()
        again = model(x, sigma, cap)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert any(n.endswith("weight_scale") for u in s.units for n in u.names)
    after = {n: b for n, b in model.named_buffers() if n.endswith("weight_scale")}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_plain_fp8_weights_get_scale_one():
    lin = fp8_layer()
    lin.weight = torch.nn.Parameter(lin.weight.detach().to(E4M3), requires_grad=False)
    assert ops.quantize_linears_fp8(lin) == 0
    assert lin.weight_scale == 1


# ---------------------------------------------------------------- the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_matmul_on_cuda_matches_the_dequant_path(compiled):
    if not (torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip("no fp8 matmuls on this GPU")
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = CastLinear(3840, 10240, bias=False, device="cuda", dtype=BF16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10240, 3840, device="cuda", generator=g) / 3840 ** 0.5)
    ops.quantize_linears_fp8(lin)
    x = torch.randn(1, 4128, 3840, device="cuda", dtype=BF16, generator=g)
    dequant = lin(x)
    lin.fp8_matmul = True
    fn = torch.compile(lin, fullgraph=True) if compiled else lin
    with torch.inference_mode():
        fast = fn(x)
    assert fast.dtype == BF16 and fast.shape == dequant.shape
    assert rel_l2(fast, dequant) < 0.05
    torch._dynamo.reset()


@pytest.mark.parametrize("fp8_matmul", [False, True])
def test_compiled_dit_blocks_with_fp8_weights_match_eager(fp8_on_cpu, fp8_matmul):
    """core/compile.py's regional compile (dynamic token dimension) over fp8 blocks: no graph breaks, and the
    output of eager up to rounding. (Compiled, the dequant path scales the weight where eager scales a short
    output, e.g. adaLN's; the bf16 rounding differences that makes are amplified by this random tiny DiT, and
    more so where activations are quantized to e4m3: ~1 % and ~4 % here, against ~9 % from bf16 weights.)"""
    from torch._dynamo.utils import counters
    from zimage_nodes.core import compile as dit_compile
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        want = tiny_dit().to(BF16)(*dit_inputs(BF16))
    model = tiny_dit().to(BF16)
    ops.quantize_linears_fp8(model, fp8_matmul=fp8_matmul)
    with torch.inference_mode():
        eager = model(*dit_inputs(BF16))
        dit_compile.enable(model, backend="aot_eager")
        try:
            compiled = model(*dit_inputs(BF16))
        finally:
            dit_compile.disable(model)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert rel_l2(compiled, eager) < (0.06 if fp8_matmul else 0.02)
    assert rel_l2(compiled, want) < 0.15
    assert bool(fp8_on_cpu) == fp8_matmul
    torch._dynamo.reset()
