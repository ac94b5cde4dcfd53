"""A tiny Mistral built offline: 2 layers, random weights, a byte-level BPE tokenizer trained on a few sentences.

Its text is gibberish, but it is loaded, prompted, batched, streamed and fine-tuned exactly like the real
Mistral-7B-Instruct, in well under a second on a CPU.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

MARKER = ".helix-tiny-mistral"  # written last: its presence means the directory is complete
VERSION = 1  # bump when the recipe changes, so stale builds are rebuilt
SEED = 1234
VOCAB_SIZE = 400

# Mistral-Instruct's layout ([INST] ... [/INST] answer</s>), plus a system message folded into the
# first user turn, as Mistral's own later templates do; any other role is an error.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system %}{{- '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Unknown role: ' + message['role']) }}{%- endif %}"
    "{%- endfor %}"
)

SENTENCES = [
    "Hello! How are you today?",
    "I am fine, thank you. And you?",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a story about a dragon who learned to paint.",
    "Once upon a time there was a small village by the sea.",
    "The quick brown fox jumps over the lazy dog.",
    "Helix runs open models on your own GPUs.",
    "A runner loads the model once and pulls tasks from the API.",
    "Fine-tuning trains a small adapter on your own data.",
    "Write a haiku about autumn leaves falling in the wind.",
    "Summarise this paragraph in one sentence, please.",
    "Translate 'good morning' into Spanish: buenos dias.",
    "Python is a programming language that is easy to read.",
    "Can you explain what a neural network is?",
    "A neural network is a function with many learned parameters.",
    "What is two plus two? Two plus two is four.",
    "The weather is sunny with a light breeze from the west.",
    "Please list three colours: red, green and blue.",
    "My favourite food is pizza with tomatoes and basil.",
    "Thank you for your help, goodbye!",
    "[INST] Who are you? [/INST] I am a helpful assistant.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Symbols and punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ + = / \\ * & % $ # @",
    "Une phrase en français, avec des accents: é è à ç ù.",
    "Streaming tokens appear one by one as the model writes them.",
    "Cancel a long generation and the runner stops within a few tokens.",
]


def build_tiny_mistral(path: str | Path) -> Path:
    """Build the tiny model and tokenizer into `path` (reused when already complete); the path."""
    path = Path(path)
    marker = path / MARKER
    if marker.exists() and marker.read_text().strip() == str(VERSION):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and move it in, so a crash or a concurrent builder never leaves half a model.
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-mistral-", dir=path.parent))
    try:
        tokenizer = _tokenizer()
        _model(tokenizer).save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / MARKER).write_text(str(VERSION))
        if marker.exists() and marker.read_text().strip() == str(VERSION):
            return path  # another process finished first
        if path.exists():
            shutil.rmtree(path)
        scratch.rename(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _tokenizer():
    """A byte-level BPE tokenizer (any text round-trips) with Mistral's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    # Like Mistral's tokenizer: encoding a plain string starts it with <s>.
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=2048,
    )


def _model(tokenizer):
    """A 2-layer MistralForCausalLM with seeded random weights, sized to the tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, sliding_window=None,
        # Larger than the usual 0.02 so the random logits are peaked enough for sampling params to matter.
        initializer_range=0.3,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = MistralForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model

