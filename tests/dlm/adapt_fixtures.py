"""A tiny Llama-shaped AR checkpoint folder (random weights, character tokenizer with SmolLM2's
special tokens and chat template), built on the fly for the adaptation tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<jupyter_script>", "<empty_output>"]


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|im_end|>", unk_token="<unk>", chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def tiny_ar_checkpoint(folder: Path, seed: int = 0, eos_bias: bool = True) -> Path:
    """Save a tiny random LlamaForCausalLM + tokenizer as a Hugging Face folder.

    A random model would almost never emit EOS; here every embedding carries a constant
    component that the EOS row of the (untied) output layer reads, so EOS has a probability of
    roughly 15% at every position: sampled replies end after a few tokens, greedy ones at once.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=50_000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        if eos_bias:
            model.model.embed_tokens.weight[:, 0] = 3.0
            model.lm_head.weight[2] = 0.0
            model.lm_head.weight[2, 0] = 0.5
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
