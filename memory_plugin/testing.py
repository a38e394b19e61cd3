"""Tiny, offline, randomly initialised models for tests (this package's and its integrations').

Example:
    >>> tok = tiny_tokenizer()
    >>> model = tiny_llama(len(tok))
    >>> mem = ContextMemory(model, tok, TINY_CONFIG)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .config import MemoryConfig

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 12345. Remember it. What is the pass key? user assistant system tool",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-{}[]<>=_/",
]

#: A geometry under which blocks form within a few hundred tokens.
TINY_CONFIG = MemoryConfig(block_size=16, n_init=8, n_local=64, topk=2, repr_topk=2, chunk_size=32, max_cached_blocks=4)


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (any text encodes) with a ChatML chat template, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML,
    )


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer Llama (hidden 64, 4 query / 2 KV heads) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval().requires_grad_(False)


def tiny_pair():
    """``(tiny_llama, tiny_tokenizer)`` as a server process loads them (``loader="memory_plugin.testing:tiny_pair"``
    for the Ray Serve replicas, which cannot be handed the test's own objects)."""
    tok = tiny_tokenizer()
    return tiny_llama(len(tok)), tok
