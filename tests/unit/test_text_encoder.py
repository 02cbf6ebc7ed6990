"""core.text_encoder: hidden_states[-2] equivalence (transformers and ComfyUI), tokenizer, cache."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3Model

from tests import comfy_env
from zimage_nodes.core import text_encoder as T
from zimage_nodes.core.errors import CheckpointError, InputError

TINY = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, intermediate_size=128)
PROMPTS = ["a photo of a cat sitting on a windowsill, golden hour",
           "一只猫坐在窗台上，夕阳西下",
           "🐱🚀 party time ✨ (masterpiece:1.2)",
           ""]


def tokenizer_folder() -> Path:
    return comfy_env.comfy_root() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def tiny_config() -> Qwen3Config:
    return Qwen3Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=40960)


@pytest.fixture(scope="module")
def file_state() -> dict[str, torch.Tensor]:
    """Random weights of a 3-layer Qwen3 under the single-file names (``model.`` prefix), scaled so
    that every layer changes its input noticeably."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3Model(tiny_config()).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state["model." + name] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            state["model." + name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return state


@pytest.fixture(scope="module")
def full_model(file_state) -> Qwen3Model:
    model = Qwen3Model(tiny_config()).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in file_state.items()}, strict=True)
    return model


@pytest.fixture(scope="module")
def encoder(file_state) -> T.ZImageTextEncoder:
    shapes = {k: tuple(v.shape) for k, v in file_state.items()}
    model = T.build_text_encoder(T.qwen3_config_from_shapes(shapes), device="meta", dtype=torch.float32)
    state = {name: file_state[key] for key, name in T.te_key_map(shapes).items()}
    model.load_state_dict(state, strict=True, assign=True)  # the key map covers every parameter
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return T.load_tokenizer(tokenizer_folder())


def test_config_from_shapes(file_state):
    shapes = {k: tuple(v.shape) for k, v in file_state.items()}
    for prefix, named in (("model.", shapes), ("", {k.removeprefix("model."): v for k, v in shapes.items()})):
        cfg = T.qwen3_config_from_shapes(named, prefix)
        got = {k: getattr(cfg, k) for k in TINY}
        assert got == TINY
        assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings
        assert cfg.max_position_embeddings == 40960 and not cfg.attention_bias


def test_key_map_skips_the_last_layer_and_final_norm(file_state):
    shapes = {k: tuple(v.shape) for k, v in file_state.items()}
    key_map = T.te_key_map(shapes)
    assert "model.norm.weight" not in key_map
    assert not [k for k in key_map if k.startswith("model.layers.2.")]
    assert key_map["model.layers.1.self_attn.q_norm.weight"] == "model.layers.1.self_attn.q_norm.weight"
    bare = T.te_key_map({k.removeprefix("model."): v for k, v in shapes.items()}, prefix="")
    assert bare["layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.up_proj.weight"
    assert sorted(bare.values()) == sorted(key_map.values())


def test_encoder_is_hidden_states_minus_two(encoder, full_model):
    """transformers 5.x: hidden_states = (embeddings, layer 0, ..., layer N-2, norm(layer N-1)), so
    [-2] is the second-to-last layer's raw output; our model (N-1 layers, no norm) returns it."""
    ids = torch.randint(0, TINY["vocab_size"], (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = full_model(input_ids=ids, output_hidden_states=True).hidden_states
        ours = encoder(ids)
    assert len(hidden) == TINY["num_hidden_layers"] + 1
    assert ours.shape == (1, 23, TINY["hidden_size"]) and ours.dtype == torch.float32
    assert torch.allclose(ours, hidden[-2], atol=1e-6)  # measured 0.0 (bit-identical)
    assert (hidden[-2] - hidden[-3]).abs().mean() > 0.1 and (hidden[-1] - hidden[-2]).abs().mean() > 0.1
    assert encoder.model.config._attn_implementation == "sdpa" and len(encoder.model.layers) == 2
    assert not [n for n, p in encoder.named_parameters() if p.is_meta]
    assert encoder.model.rotary_emb.inv_freq.dtype == torch.float32


def test_bf16_build_keeps_fp32_rope(file_state):
    shapes = {k: tuple(v.shape) for k, v in file_state.items()}
    model = T.build_text_encoder(T.qwen3_config_from_shapes(shapes), dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32 and not model.model.rotary_emb.inv_freq.is_meta


def test_equals_comfyui_text_encoder(comfy_modules, file_state, encoder, tokenizer, monkeypatch):
    """ComfyUI's own Z-Image path (ZImageTokenizer -> ZImageTEModel: Llama2_ with Qwen3_4BConfig,
    layer_idx=-2, no final norm on the intermediate) with the same tiny weights."""
    import comfy.text_encoders.llama
    import comfy.text_encoders.z_image
    monkeypatch.setattr(comfy.text_encoders.llama.Qwen3_4BConfig, "head_dim", TINY["head_dim"])
    overrides = {k: v for k, v in TINY.items() if k != "head_dim"}
    comfy_te = comfy.text_encoders.z_image.ZImageTEModel(
        device="cpu", dtype=torch.float32, model_options={"qwen3_4b_model_config": overrides})
    missing, unexpected = comfy_te.load_sd(file_state)
    assert not missing and not unexpected
    comfy_tok = comfy.text_encoders.z_image.ZImageTokenizer()
    for prompt in PROMPTS:
        tokens = comfy_tok.tokenize_with_weights(prompt)
        comfy_ids = [t[0] for t in tokens["qwen3_4b"][0]]
        ids, truncated = T.tokenize(tokenizer, prompt)
        assert ids == comfy_ids and not truncated, prompt
        with torch.no_grad():
            reference = comfy_te.encode_token_weights(tokens)[0]
            ours = encoder(torch.tensor([ids]))
        assert reference.shape == ours.shape
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5), (prompt, (ours - reference).abs().max())


def test_tokenize_applies_the_template_by_hand(tokenizer):
    ids, truncated = T.tokenize(tokenizer, "a cat")
    assert not truncated
    assert tokenizer.decode(ids) == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == 151644 and ids.count(151645) == 1  # <|im_start|>, <|im_end|>; no system line


def test_truncation_is_reported(tokenizer):
    ids, truncated = T.tokenize(tokenizer, "word " * 600)
    assert truncated and len(ids) == T.MAX_TOKENS == 512
    short, cut = T.tokenize(tokenizer, "word " * 600, max_tokens=10)
    assert cut and short == ids[:10]
    with pytest.raises(InputError):
        T.tokenize(tokenizer, "a cat", max_tokens=0)


def test_tokenizer_from_tokenizer_json_only(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "saved")
    (tmp_path / "json_only").mkdir()
    shutil.copy(tmp_path / "saved" / "tokenizer.json", tmp_path / "json_only")
    other = T.load_tokenizer(tmp_path / "json_only")
    for prompt in PROMPTS:
        assert T.tokenize(other, prompt) == T.tokenize(tokenizer, prompt)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(CheckpointError, match="Missing tokenizer") as e:
        T.load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "qwen25_tokenizer" in e.value.fix
    assert "tokenizer.json" in e.value.expected and "merges.txt" in e.value.expected
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(CheckpointError, match="Could not read"):
        T.load_tokenizer(tmp_path / "damaged")
    for name in ("vocab.json", "merges.txt"):  # without tokenizer_config.json the chat tokens are unknown
        shutil.copy(tokenizer_folder() / name, tmp_path)
    with pytest.raises(CheckpointError, match="Missing tokenizer"):
        T.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")  # one that does not declare them
    with pytest.raises(CheckpointError, match="does not know the chat token"):
        T.load_tokenizer(tmp_path)


def test_files_that_are_not_usable(file_state):
    shapes = {k: tuple(v.shape) for k, v in file_state.items()}
    with pytest.raises(CheckpointError, match="not a Qwen3") as e:
        T.qwen3_config_from_shapes({"encoder.conv_in.weight": (128, 3, 3, 3)})
    assert "embed_tokens" in e.value.found
    scaled = dict(shapes, **{"model.layers.0.self_attn.q_proj.scale_weight": ()})
    with pytest.raises(CheckpointError, match="cannot use") as e:
        T.te_key_map(scaled)
    assert "scale_weight" in e.value.found
    gap = {k: v for k, v in shapes.items() if not k.startswith("model.layers.1.")}
    with pytest.raises(CheckpointError, match="numbered"):
        T.qwen3_config_from_shapes(gap)


def test_cache_hits_misses_and_identity():
    cache = T.EmbeddingCache(max_entries=2)
    emb = torch.randn(1, 7, 64)
    assert cache.get("a cat", "te-A") is None
    cache.put("a cat", "te-A", emb)
    got = cache.get("a cat", "te-A")
    assert torch.equal(got, emb)
    got.zero_()  # callers get copies
    assert torch.equal(cache.get("a cat", "te-A"), emb)
    assert cache.get("a cat", "te-B") is None
    assert cache.get("a dog", "te-A") is None
    assert cache.stats == {"hits": 2, "misses": 3, "entries": 1}
    cache.put("b", "te-A", emb)
    cache.put("c", "te-A", emb)  # evicts the least recently used ("a cat")
    assert cache.get("a cat", "te-A") is None and cache.get("c", "te-A") is not None


def test_cache_on_disk(tmp_path):
    emb = torch.randn(1, 5, 64).to(torch.bfloat16)
    T.EmbeddingCache(directory=tmp_path).put("一只猫", "te-A", emb)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors" and len(files[0].stem) == 64
    fresh = T.EmbeddingCache(directory=tmp_path)
    got = fresh.get("一只猫", "te-A")
    assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got, emb)
    assert fresh.get("一只猫", "te-B") is None
    assert fresh.stats["hits"] == 1 and fresh.stats["misses"] == 1
    files[0].write_bytes(b"damaged")
    assert T.EmbeddingCache(directory=tmp_path).get("一只猫", "te-A") is None
