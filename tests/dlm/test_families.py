"""Every family loads from a tiny random checkpoint with its real config keys and tensor names,
is detected from its own metadata, and matches a transformers reference on the same weights."""

from __future__ import annotations

import pytest
import tiny_checkpoints as tiny
import torch

from dlm.checkpoints import detect_family, load_model
from dlm.masks import block_causal_mask, causal_mask, full_mask


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    T = ids.shape[1]
    with torch.no_grad():
        return model(ids, torch.arange(T)[None], mask)


@pytest.fixture(scope="module", params=sorted(tiny.BUILDERS))
def built(request, tmp_path_factory):
    family = request.param
    path, ref = tiny.BUILDERS[family](tmp_path_factory.mktemp(family) / "ckpt")
    return family, path, ref


def test_family_is_detected(built):
    family, path, _ = built
    assert detect_family(path) == family


def test_logits_match_the_transformers_reference(built):
    family, path, ref = built
    loaded = load_model(path)
    assert loaded.family == family and loaded.spec.family == family
    ids = torch.randint(5, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = _logits(loaded.model, ids, causal_mask(12))
    with torch.no_grad():
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


EXPECTED_SPECS = {
    # family: (attention, mask id, logit shift, block size)
    "fast_dllm_v2": ("block_causal", 151665, True, 32),
    "sdar": ("block_causal", tiny.MASK_ID, False, 4),
    "llada": ("full", tiny.MASK_ID, False, 32),
    "dream": ("full", tiny.MASK_ID, True, 32),
    "ar": ("causal", None, True, 1),
}


def test_spec_comes_from_the_checkpoint(built):
    family, path, _ = built
    spec = load_model(path).spec
    assert (spec.attention, spec.mask_token_id, spec.logit_shift, spec.block_size) == EXPECTED_SPECS[family]
    assert 2 in spec.eos_token_ids  # <|im_end|> of the chat template ends a turn in every family


def test_forward_runs_with_the_family_attention(built):
    _, path, _ = built
    loaded = load_model(path)
    masks = {"causal": causal_mask(16), "full": full_mask(16),
             "block_causal": block_causal_mask(16, min(loaded.spec.block_size, 8))}
    ids = torch.full((1, 16), loaded.spec.mask_token_id or 0)
    ids[0, :8] = torch.arange(10, 18)
    logits = _logits(loaded.model, ids, masks[loaded.spec.attention])
    assert logits.shape == (1, 16, loaded.config.vocab_size) and torch.isfinite(logits).all()


def test_llada_tensor_names_map_onto_llama_names(tmp_path):
    path, ref = tiny.llada(tmp_path / "llada")
    sd = load_model(path).model.state_dict()
    for name, tensor in ref.state_dict().items():
        torch.testing.assert_close(sd[name], tensor, msg=name)


def test_dream_tokenizer_loads_without_remote_code(tmp_path):
    path, _ = tiny.dream(tmp_path / "dream")
    tok = load_model(path).tokenizer
    reference = tiny.hf_tokenizer()
    text = "Hello there <|im_end|>"
    assert tok.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert tok.chat_template == tiny.CHATML


def test_tiny_gguf_matches_reference(tmp_path):
    path, ref = tiny.llama_gguf(tmp_path / "tiny.gguf")
    assert detect_family(path) == "ar"
    loaded = load_model(path, cache_dir=tmp_path / "cache")
    assert loaded.family == "ar" and loaded.config.tie_embeddings
    ids = torch.randint(5, 250, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits
    torch.testing.assert_close(_logits(loaded.model, ids, causal_mask(10)), theirs, atol=1e-4, rtol=1e-4)
    assert list(loaded.tokenizer.encode("Hello there", add_special_tokens=False)) == \
        tiny.hf_tokenizer().encode("Hello there", add_special_tokens=False)
    assert 2 in loaded.spec.eos_token_ids
    # second load: from the converted cache file, same weights
    again = load_model(path, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(again.model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                               loaded.model.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
