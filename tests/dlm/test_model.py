"""dlm.model / dlm.masks: Hugging Face names, cached == cache-free, the BD3-LM training mask."""

from __future__ import annotations

import pytest
import torch
from dlm_tiny_models import tiny_config

from dlm.masks import block_causal_mask, block_diff_mask, causal_mask, full_mask, limit_mask
from dlm.memory import resident_bytes
from dlm.model import Transformer, lazy_zeros


def _hf_names(n_layers: int, *, qkv_bias: bool, qk_norm: bool, tied: bool) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tied:
        names.add("lm_head.weight")
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
        names |= {p + f"self_attn.{m}_proj.weight" for m in "qkvo"}
        if qkv_bias:
            names |= {p + f"self_attn.{m}_proj.bias" for m in "qkv"}
        if qk_norm:
            names |= {p + f"self_attn.{m}_norm.weight" for m in "qk"}
    return names


@pytest.mark.parametrize("qkv_bias,qk_norm,tied", [(False, False, False), (True, False, True), (False, True, True)])
def test_state_dict_uses_hf_llama_names(qkv_bias, qk_norm, tied):
    cfg = tiny_config(qkv_bias=qkv_bias, qk_norm=qk_norm, tie_embeddings=tied)
    model = Transformer(cfg)
    sd = model.state_dict()
    assert set(sd) == _hf_names(cfg.n_layers, qkv_bias=qkv_bias, qk_norm=qk_norm, tied=tied)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)
    Transformer(cfg).load_state_dict(sd)  # strict: cache and RoPE buffers are not in the state dict
    model.new_cache(2, 32)
    assert set(model.state_dict()) == set(sd)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_a_cpu_cache_is_zeros_that_take_memory_only_where_written():
    """A cache sized for a long context and a full batch (the default model's is 1.6 GB) holds
    resident only the positions written: torch.zeros would write every page at once."""
    before = resident_bytes()
    k = lazy_zeros((30, 9, 4097, 3, 64), torch.float32, "cpu")  # 850 MB: the default model's keys
    assert resident_bytes() - before < 80e6
    assert k.shape == (30, 9, 4097, 3, 64) and k.dtype == torch.float32 and k.is_contiguous()
    assert float(k.sum()) == 0.0 and float(k.min()) == 0.0  # reads as zeros, and reading takes no memory
    assert resident_bytes() - before < 80e6
    k[:, 0, :100] = 1.5  # one row's first 100 positions in each layer: about 2.3 MB
    assert float(k.sum()) == 1.5 * 30 * 100 * 3 * 64
    assert resident_bytes() - before < 90e6
    half = lazy_zeros((4, 5), torch.bfloat16, "cpu")
    assert half.dtype == torch.bfloat16 and not half.any()
    assert lazy_zeros((0, 3), torch.float32, "cpu").shape == (0, 3)


def test_cached_forward_equals_cache_free():
    torch.manual_seed(0)
    model = Transformer(tiny_config(qkv_bias=True, qk_norm=True)).eval()
    T = 12
    tokens = torch.randint(0, 60, (2, T))
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        ref = model(tokens, pos, causal_mask(T))  # (B, T, V)
        cache = model.new_cache(3, 64)
        rows = torch.tensor([2, 0])  # any cache rows
        parts = [model(tokens[:, a:b], pos[:, a:b], limit_mask(pos[:, a:b] + 1, 16), cache=cache, cache_rows=rows)
                 for a, b in ((0, 5), (5, 6), (6, T))]
    torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-5, rtol=1e-5)


def test_out_index_selects_positions():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    tokens = torch.randint(0, 60, (1, 8))
    pos = torch.arange(8)[None]
    with torch.no_grad():
        full = model(tokens, pos, full_mask(8))
        some = model(tokens, pos, full_mask(8), out_index=torch.tensor([[7, 2]]))
    torch.testing.assert_close(some, full[:, [7, 2]])


def test_block_diff_mask_clean_half_is_block_causal():
    """x_t ⊕ x_0 with positions repeated: the clean half equals a block-causal forward on x_0,
    and the noisy half sees its own block plus the clean earlier blocks only."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    L, bs = 8, 4
    x0 = torch.randint(0, 60, (1, L))
    xt = x0.clone()
    xt[:, [1, 2, 5]] = 63
    pos = torch.arange(L)[None]
    with torch.no_grad():
        both = model(torch.cat([xt, x0], 1), torch.cat([pos, pos], 1), block_diff_mask(L, bs))
        clean = model(x0, pos, block_causal_mask(L, bs))
        # Noisy block 1 = clean block 0 followed by noisy block 1, block-causal.
        ref_noisy = model(torch.cat([x0[:, :4], xt[:, 4:]], 1), pos, block_causal_mask(L, bs))
    torch.testing.assert_close(both[:, L:], clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:, 4:L], ref_noisy[:, 4:], atol=1e-5, rtol=1e-5)
    m = block_diff_mask(L, bs)[0, 0]
    assert not m[L:, :L].any()  # clean never sees noisy


def test_bfloat16_runs():
    model = Transformer(tiny_config()).to(torch.bfloat16).eval()
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], limit_mask(torch.tensor([[1, 2, 3]]), 16),
                    cache=cache, cache_rows=torch.tensor([0]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_two_batch_rows_may_share_a_cache_row():
    """The decoder's fused block write: a clean block in one batch row and the noisy next block
    in another, both in cache row 0, equal one row feeding both blocks block-causally."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(qkv_bias=True)).eval()
    bs = 4
    tokens = torch.randint(0, 60, (1, 3 * bs))
    pos = torch.arange(3 * bs)[None]
    lim = (pos // bs + 1) * bs  # block-causal key limits
    with torch.no_grad():
        ref = model(tokens, pos, block_causal_mask(3 * bs, bs))
        cache = model.new_cache(2, 32)
        model(tokens[:, :bs], pos[:, :bs], limit_mask(lim[:, :bs], 16), cache=cache, cache_rows=torch.tensor([0]))
        clean, noisy = slice(bs, 2 * bs), slice(2 * bs, 3 * bs)
        fused = model(torch.cat([tokens[:, clean], tokens[:, noisy]]), torch.cat([pos[:, clean], pos[:, noisy]]),
                      limit_mask(torch.cat([lim[:, clean], lim[:, noisy]]), 16), cache=cache,
                      cache_rows=torch.tensor([0, 0]))
    torch.testing.assert_close(fused[0], ref[0, clean], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], ref[0, noisy], atol=1e-5, rtol=1e-5)


def test_cache_longer_than_the_rope_table_is_refused():
    model = Transformer(tiny_config(max_seq_len=64))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 128)
