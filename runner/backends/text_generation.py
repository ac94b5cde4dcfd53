"""A decode loop for causal LMs that serves several requests as one batch, each row on its own terms.

Every row has its own sampling params, seed (a torch.Generator), stop strings, token budget, stream and
cancellation, and leaves the batch as soon as it is done; so a request gets the same text whether it
runs alone or beside others. A row may also carry a constraint (a grammar's state that masks its own
logits before it chooses) and ask for logprobs; rows that do neither pay nothing for either.
Prompts are left-padded, with an attention mask and position ids that skip the padding, and the KV
cache carries the batch from one step to the next.

With `max_batch` > 1 an engine thread gathers the requests that predict() threads submit (waiting a
few milliseconds for the others in flight) and decodes them together.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.backends import params as param
from runner.errors import BadTaskInput, TaskCancelled

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
GATHER_SECONDS = 0.02  # how long the engine waits for requests still on their way into a batch


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Sampling is on when `do_sample` says so, or when only a temperature > 0 is given."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: dict[str, Any], default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
                    ) -> SamplingParams:
        """Read a task's params; BadTaskInput names one that cannot be used. A missing seed gets a random one."""
        temperature = param.number(params, "temperature", 1.0, low=0)
        do_sample = param.flag(params, "do_sample", params.get("temperature") is not None and temperature > 0)
        return cls(
            max_new_tokens=param.integer(params, "max_new_tokens", default_max_new_tokens, low=1),
            do_sample=do_sample and temperature > 0,
            temperature=temperature,
            top_k=param.integer(params, "top_k", 0, low=0),
            top_p=param.number(params, "top_p", 1.0, above=0),
            repetition_penalty=param.number(params, "repetition_penalty", 1.0, above=0),
            seed=param.integer(params, "seed", secrets.randbelow(2**31), low=0),
            stop=param.strings(params, "stop"),
        )


class TokenConstraint(Protocol):
    """What the loop asks of a row's constraint (see runner.backends.constraints.RowConstraint)."""

    def mask(self, logits: Any) -> Any:
        """This row's logits (1-D) with the tokens it may not choose at -inf."""

    def consume(self, token_id: int) -> bool:
        """Follow the chosen token; False if it is refused."""

    @property
    def stopped(self) -> bool:
        """Whether nothing may follow: the row is complete."""

    @property
    def error(self) -> str:
        """Why a token was refused."""


@dataclass(eq=False)  # compared by identity: two asks for the same text are still two requests
class GenerationRequest:
    """One prompt to continue, with callbacks into its task; the outcome is filled in when `done` is set."""

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] = lambda text: None  # may raise TaskCancelled: the row stops
    cancelled: Callable[[], bool] = lambda: False
    adapter: str | None = None  # which adapter the batch must run with (None: the bare base model)
    adapter_path: str | None = None
    # A grammar's per-row state (runner.backends.constraints.RowConstraint): it masks this row's logits only.
    constraint: TokenConstraint | None = None
    logprobs: bool = False  # record each token's logprob (and `top_logprobs` alternatives) in `token_logprobs`
    top_logprobs: int = 0
    keep_special_tokens: bool = False  # decode special tokens into the text (a call marker that is one)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" (or "error": the constraint refused a token)
    completion_tokens: int = 0
    token_logprobs: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class IncrementalDecoder:
    """Turns tokens into text pieces whose concatenation is the decoded text, whole characters only."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # Decoding a window that starts a few tokens back keeps the spacing a tokenizer derives from context.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add a token; the new text it completes (may be empty while a character is unfinished)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever text is still held back, e.g. an incomplete character at the end."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        after = decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""


class RowRefused(BadTaskInput):
    """A row's constraint refused its token or allows none: that row fails, the batch goes on.

    The task's own grammar is at fault and a retry (same seed, same grammar) would fail the same way: no retry."""


class _Row:
    """A request's decoding state inside a batch."""

    def __init__(self, request: GenerationRequest, tokenizer: Any, vocab_size: int, device: Any,
                 token_text: Callable[[int], str] | None = None) -> None:
        import torch

        self.request = request
        self.params = request.params
        self.generator = torch.Generator(device=device).manual_seed(request.params.seed)
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=not request.keep_special_tokens)
        self.constraint = request.constraint
        # Rows that asked for logprobs keep (token, logprob, alternatives) per token; the others pay nothing.
        self.top_logprobs = max(0, request.top_logprobs) if request.logprobs else None
        self.token_text = token_text or (lambda token_id: tokenizer.decode([token_id]))
        self._scored: list[tuple[int, float, list[tuple[int, float]]]] = []
        self._pending: tuple[int, float, list[tuple[int, float]]] | None = None
        self.text = ""
        self.streamed = 0  # characters of `text` already handed to on_text
        self.generated = 0
        self.position = len(request.prompt_ids)  # position id of the next token
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(request.prompt_ids, device=device)] = True

    def choose(self, logits: Any) -> int:
        """The next token from this row's logits (1-D, float32), with its own params and generator."""
        import torch

        p = self.params
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.constraint is not None:
            if self.constraint.error:
                raise RowRefused(f"the reply's grammar failed: {self.constraint.error}")
            logits = self.constraint.mask(logits)
            if self.constraint.error:  # a matcher that failed while masking allows only the end token
                raise RowRefused(f"the reply's grammar failed: {self.constraint.error}")
        token = self._pick(logits)
        if self.top_logprobs is not None:
            self._pending = self._score(logits, token)
        return token

    def _score(self, logits: Any, token: int) -> tuple[int, float, list[tuple[int, float]]]:
        """The chosen token's logprob and the most likely alternatives (log_softmax before temperature)."""
        import torch

        logprobs = torch.log_softmax(logits, dim=-1)
        alternatives: list[tuple[int, float]] = []
        if self.top_logprobs:
            top = torch.topk(logprobs, min(self.top_logprobs, logprobs.numel()))
            alternatives = [(int(i), float(v)) for i, v in zip(top.indices.tolist(), top.values.tolist(),
                                                                strict=True) if v != float("-inf")]
        return token, float(logprobs[token]), alternatives

    def _pick(self, logits: Any) -> int:
        """Greedy or sampled, with this row's params and generator."""
        import torch

        p = self.params
        if not p.do_sample:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Drop a token when the ones before it already reach top_p; the most likely always stays.
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, token_id: int, eos_ids: frozenset[int]) -> bool:
        """Take a chosen token; True when the row is finished."""
        self.generated += 1
        self.position += 1
        if self.seen is not None:
            self.seen[token_id] = True
        if token_id in eos_ids:
            return self.finish("stop")
        if self.constraint is not None and not self.constraint.consume(token_id):
            raise RowRefused(f"the reply's grammar refused token {token_id}: {self.constraint.error}")
        if self._pending is not None:
            self._scored.append(self._pending)
            self._pending = None
        self.text += self.decoder.push(token_id)
        if self._cut_at_stop() or (self.constraint is not None and self.constraint.stopped):
            return self.finish("stop")
        if self.generated >= self.params.max_new_tokens:
            return self.finish("length")
        if self._stream(final=False):
            return self.finish("cancelled")
        return False

    def finish(self, reason: str) -> bool:
        """End the row: flush held text (unless cancelled) and record why."""
        if reason != "cancelled":
            self.text += self.decoder.flush()
            if self._cut_at_stop():
                reason = "stop"
            if self._stream(final=True):
                reason = "cancelled"
        self.request.finish_reason = reason
        self.request.text = self.text[: self.streamed] if reason == "cancelled" else self.text
        self.request.completion_tokens = self.generated
        if self.top_logprobs is not None:
            self.request.token_logprobs = [
                {**self._entry(token, logprob),
                 "top_logprobs": [self._entry(other, value) for other, value in alternatives]}
                for token, logprob, alternatives in self._scored]
        return True

    def fail(self, error: BaseException) -> bool:
        """End the row with an error of its own (the batch goes on)."""
        self.request.error = error
        self.request.finish_reason = "error"
        self.request.text = self.text
        self.request.completion_tokens = self.generated
        return True

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _cut_at_stop(self) -> bool:
        """Cut the text at the first stop string in it; True if there was one."""
        longest = max((len(s) for s in self.params.stop), default=0)
        start = max(0, self.streamed - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def _stream(self, final: bool) -> bool:
        """Hand on the text that can no longer turn into a stop string; True if the task was cancelled."""
        end = len(self.text)
        if not final:
            # Hold back a tail that may be the start of a stop string.
            for stop in self.params.stop:
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:size]):
                        end = min(end, len(self.text) - size)
                        break
        if end > self.streamed:
            piece = self.text[self.streamed:end]
            try:
                self.request.on_text(piece)
            except TaskCancelled:
                return True
            self.streamed = end
        return False


class _Batch:
    """Rows decoding together: the attention mask and KV cache so far, and each row's next input token."""

    def __init__(self, rows: list[_Row], mask: Any, cache: Any) -> None:
        self.rows = rows
        self.mask = mask  # [rows, cached length]: 0 over left padding
        self.cache = cache
        self.tokens: list[int] = []

    @classmethod
    def merge(cls, first: _Batch, second: _Batch) -> _Batch:
        """One batch of both, each left-padded (mask and cache) to the longer one's length."""
        import torch
        import torch.nn.functional as F

        length = max(first.mask.shape[1], second.mask.shape[1])
        pads = (length - first.mask.shape[1], length - second.mask.shape[1])
        for mine, theirs in zip(first.cache.layers, second.cache.layers, strict=True):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, pads[0], 0)), F.pad(theirs.keys, (0, 0, pads[1], 0))])
            mine.values = torch.cat([F.pad(mine.values, (0, 0, pads[0], 0)),
                                     F.pad(theirs.values, (0, 0, pads[1], 0))])
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = length
        mask = torch.cat([F.pad(first.mask, (pads[0], 0)), F.pad(second.mask, (pads[1], 0))])
        merged = cls(first.rows + second.rows, mask, first.cache)
        merged.tokens = first.tokens + second.tokens
        return merged


def _can_extend(cache: Any, length: int) -> bool:
    """Whether rows can be padded into this cache to `length`: plain per-layer tensors, nothing slid out yet."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    for layer in layers:
        if not hasattr(layer, "keys") or type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            return False
        window = getattr(layer, "sliding_window", None)
        if window is not None and (length >= window - 1 or layer.cumulative_length != layer.keys.shape[-2]):
            return False
    return True


class TextGenerator:
    """Runs generation requests on one loaded model, batching up to `max_batch` of them together."""

    def __init__(self, model: Any, tokenizer: Any, *, device: Any, max_batch: int = 1,
                 eos_ids: set[int] | None = None, adapters: Any = None,
                 gather_seconds: float = GATHER_SECONDS) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch = max(1, max_batch)
        self.adapters = adapters  # an AdapterCache, or None when adapters are not supported
        self.gather_seconds = gather_seconds
        self.pad_id = _pad_id(tokenizer)
        self.eos_ids = frozenset(eos_ids if eos_ids is not None else _eos_ids(model, tokenizer))
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._model_lock = threading.Lock()
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._held: list[GenerationRequest] = []  # taken from the queue, waiting for their adapter's turn
        self._arriving = 0  # predict() calls about to submit: worth waiting for
        self._arriving_lock = threading.Lock()
        self._engine: threading.Thread | None = None
        self._closing = threading.Event()
        self._token_texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs show it (special tokens included), remembered once decoded."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def arriving(self) -> AbstractContextManager[None]:
        """Wrap the preparation of a request, so the engine waits for it when gathering a batch."""
        return _Arriving(self) if self.max_batch > 1 else nullcontext()

    def generate(self, request: GenerationRequest) -> GenerationRequest:
        """Run a request to its end (alone, or in a batch with others); its outcome is on it."""
        self.submit(request)
        return self.wait(request)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request for the engine (with max_batch 1, wait() runs it on the caller's thread)."""
        if self.max_batch > 1:
            self._start_engine()
            self._queue.put(request)

    def wait(self, request: GenerationRequest) -> GenerationRequest:
        """Block until a submitted request is done; raises what its batch raised."""
        if self.max_batch == 1:
            with self._model_lock:
                self.run_batch([request])
        else:
            request.done.wait()
        if request.error is not None:
            raise request.error
        return request

    def close(self) -> None:
        """Stop the engine thread (requests in a batch finish first)."""
        self._closing.set()
        if self._engine is not None:
            self._engine.join(timeout=10)

    def run_batch(self, requests: list[GenerationRequest], admit: bool = False) -> None:
        """Decode `requests` together (they share one adapter) until every row is done.

        With `admit`, queued requests for the same adapter join the batch between steps as rows leave it.
        """
        members = list(requests)  # grows as requests join
        try:
            if self.adapters is not None:
                self.adapters.activate(requests[0].adapter, requests[0].adapter_path)
            self._decode(members, admit)
        except BaseException as exc:
            for request in members:
                if request.finish_reason is None:
                    request.error = exc
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, BadTaskInput):  # an adapter that cannot be loaded: the tasks' fault, not ours
                logger.warning("batch of %d not run: %s", len(members), exc)
            else:
                logger.exception("generation failed for a batch of %d", len(members))
        finally:
            for request in members:
                request.done.set()

    # The decode loop.

    def _decode(self, members: list[GenerationRequest], admit: bool) -> None:
        import torch

        with torch.inference_mode():
            batch = self._prefill(list(members))
            while batch is not None:
                if admit and len(batch.rows) < self.max_batch:
                    batch = self._admit(batch, members)
                mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=-1)
                out = self.model(input_ids=torch.tensor(batch.tokens, device=mask.device).unsqueeze(-1),
                                 attention_mask=mask, past_key_values=batch.cache, use_cache=True,
                                 position_ids=torch.tensor([[row.position - 1] for row in batch.rows],
                                                           device=mask.device))
                batch = self._advance(_Batch(batch.rows, mask, out.past_key_values), out.logits)

    def _prefill(self, requests: list[GenerationRequest]) -> _Batch | None:
        """Run the prompts (left-padded) and choose each row's first token; the batch, or None if all are done."""
        import torch

        rows = [_Row(request, self.tokenizer, self.vocab_size, self.device, self.token_text) for request in requests]
        width = max(len(request.prompt_ids) for request in requests)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, request in enumerate(requests):
            length = len(request.prompt_ids)
            input_ids[index, width - length:] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[index, width - length:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
        return self._advance(_Batch(rows, mask, out.past_key_values), out.logits)

    def _advance(self, batch: _Batch, logits: Any) -> _Batch | None:
        """Choose every row's next token; finished rows leave the batch (cache included). None once empty."""
        import torch

        # On the input device: with layers spread over GPUs the head may sit elsewhere than the generators.
        logits = logits[:, -1, :].float().to(self.device)
        keep, tokens = [], []
        for index, row in enumerate(batch.rows):
            if row.request.cancelled():
                row.finish("cancelled")
                continue
            try:
                token = row.choose(logits[index])
                finished = row.accept(token, self.eos_ids)
            except RowRefused as exc:
                logger.warning("a row of the batch stopped: %s", exc)
                finished = row.fail(exc)
            if not finished:
                keep.append(index)
                tokens.append(token)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            chosen = torch.tensor(keep, device=batch.mask.device)
            batch.cache.batch_select_indices(chosen)
            batch = _Batch([batch.rows[index] for index in keep], batch.mask.index_select(0, chosen), batch.cache)
        batch.tokens = tokens
        return batch

    def _admit(self, batch: _Batch, members: list[GenerationRequest]) -> _Batch:
        """Let queued requests for this batch's adapter join it, up to max_batch rows."""
        adapter = batch.rows[0].request.adapter
        self._drain()
        if any(r.adapter != adapter for r in self._held):
            return batch  # let this batch drain, so requests for another adapter get their turn
        joining = self._held[: self.max_batch - len(batch.rows)]
        width = max((len(r.prompt_ids) for r in joining), default=0)
        if not joining or not _can_extend(batch.cache, max(width, batch.mask.shape[1]) + 1):
            return batch
        self._held = [r for r in self._held if r not in joining]
        members.extend(joining)
        newcomers = self._prefill(joining)
        if newcomers is None:
            return batch
        return _Batch.merge(batch, newcomers)

    # The engine thread (max_batch > 1).

    def _start_engine(self) -> None:
        with self._arriving_lock:
            if self._engine is None:
                self._engine = threading.Thread(target=self._serve, name="helix-text-engine", daemon=True)
                self._engine.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            batch = self._gather()
            if batch:
                with self._model_lock:
                    self.run_batch(batch, admit=True)

    def _gather(self) -> list[GenerationRequest]:
        """The next batch: the oldest request and those after it with the same adapter, up to max_batch."""
        if not self._held:
            try:
                self._held.append(self._queue.get(timeout=0.5))
            except queue.Empty:
                return []
        deadline = time.monotonic() + self.gather_seconds
        while True:
            self._drain()
            same = [r for r in self._held if r.adapter == self._held[0].adapter]
            waiting = time.monotonic() < deadline and self._arriving > 0
            if len(same) >= self.max_batch or not waiting:
                break
            time.sleep(0.001)
        batch = same[: self.max_batch]
        self._held = [r for r in self._held if r not in batch]
        return batch

    def _drain(self) -> None:
        while True:
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                return


class _Arriving:
    """Counts a predict() call that is preparing a request, until it has submitted it."""

    def __init__(self, generator: TextGenerator) -> None:
        self._generator = generator

    def __enter__(self) -> None:
        with self._generator._arriving_lock:
            self._generator._arriving += 1

    def __exit__(self, *exc: object) -> None:
        with self._generator._arriving_lock:
            self._generator._arriving -= 1


def _pad_id(tokenizer: Any) -> int:
    """The pad token, or a stand-in (Mistral has none): padded positions are masked anyway."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    found: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        found.add(eos)
    elif eos:
        found.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return found
