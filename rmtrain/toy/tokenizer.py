"""The tokenizer of the ``tiny`` model, built in code so that quickstart and tests need no files.

A byte-level BPE (any text encodes, no UNK) trained on the sample generator's phrases and the
safe-rlhf template, with a real ``<pad>`` distinct from ``</s>`` (pad == eos silently breaks
reward read-out), BOS added like LLaMA tokenizers, and a Llama-3-like chat template.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rmtrain.text import SAFE_RLHF_FORMAT
from rmtrain.toy import sample_data

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, *CHAT_TOKENS)

# Like Llama-3's template (which starts with <|begin_of_text|>), with this tokenizer's own tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_TARGET_VOCAB = 1024
MODEL_MAX_LENGTH = 4096


def _corpus() -> list[str]:
    return [
        SAFE_RLHF_FORMAT,
        "BEGINNING OF CONVERSATION: USER: ASSISTANT:",
        "user assistant system",
        *sample_data.corpus(),
    ]


@functools.cache
def _tokenizer_json() -> str:
    """Train once per process; BPE training on a fixed corpus is deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TARGET_VOCAB,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh transformers tokenizer (the trained backend is cached, the wrapper is not)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
