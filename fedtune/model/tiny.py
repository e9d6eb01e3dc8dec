"""The tiny causal LM that the ``tiny`` preset and the tests build from a config in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedtune.core.atomic import write_atomic_dir
from fedtune.data.loaders import DEMO_TRAIN

TINY_MODEL_DIR = "base-model"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_model(directory: Path, seed: int = 0, chat_template: bool = True, biases: bool = False) -> Path:
    # The seed is the model's own (default 0), not the run's: every site must build the same base.
    """Build (once) a tiny Llama and a BPE tokenizer trained on the demo data, saved to ``directory``.

    ``biases`` gives its attention and MLP projections bias parameters (Llama has none by default),
    so that ``peft.method = bitfit`` has something to train.
    """
    if (directory / "config.json").is_file():
        return directory

    def fill(tmp: Path) -> None:
        tokenizer = _tiny_tokenizer(chat_template)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            initializer_range=0.15,  # wider than 0.02 so a frozen random head can express peaked logits
            attention_bias=biases,
            mlp_bias=biases,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_atomic_dir(directory, fill)
    return directory


def _tiny_tokenizer(chat_template: bool) -> PreTrainedTokenizerFast:
    texts: list[Any] = []
    with DEMO_TRAIN.open() as fh:
        for line in fh:
            row = json.loads(line)
            texts += [row["instruction"], row["output"]]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        tok.chat_template = TINY_CHAT_TEMPLATE
    return tok
