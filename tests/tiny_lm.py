"""Tiny offline language models for the tests: a byte-level BPE tokenizer trained here, and random-weight causal LMs.

Nothing is downloaded: the tokenizer is trained in a fraction of a second on a
small built-in corpus, and byte-level BPE round-trips any text, so whatever a
random model generates can be decoded and tokenized again.
"""

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "Be concise: answer in one short sentence.",
    "Be verbose and detailed: explain at length, step by step.",
    "Answer in a formal, academic tone. Answer playfully, with jokes!",
    "What causes rain? Water vapour cools, condenses into droplets and falls from clouds.",
    "How do I boil an egg? Put it in boiling water for seven minutes, then cool it.",
    "The assistant is helpful and answers the question directly, or refuses politely.",
    "User: Assistant: System: 0 1 2 3 4 5 6 7 8 9 , . ; : ? ! ' \" ( ) - \n",
]


@functools.cache
def _trained_bpe(vocab_size: int) -> str:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return backend.to_str()


def bpe_tokenizer(vocab_size: int = 384, chat: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``CORPUS`` (ChatML template when ``chat``; BOS added when ``bos``)."""
    backend = Tokenizer.from_str(_trained_bpe(vocab_size))
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML if chat else None
    return tokenizer


def tiny_causal_lm(tokenizer, *, seed: int = 0, max_positions: int = 256, hidden_size: int = 32, layers: int = 2):
    """A random-weight Llama sized to ``tokenizer`` (eval mode); the same ``seed`` gives the same weights."""
    import torch

    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()
