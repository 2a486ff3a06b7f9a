"""The dlm engine: a worker thread that owns the model and serves many requests at once.

Contract (docs/contracts.md): `Engine(loaded, max_batch_size=8, ...)`; `submit(prompt, params,
on_delta=None, owner=None) -> RequestHandle`; `abort(request_id)`; `abort_owner(owner)`;
`load() -> EngineLoad`; `close()` (idempotent). Token ids in,
token ids (and their text) out: the engine renders chat messages with the checkpoint's template
and detokenizes committed ids, but knows nothing about audio, sessions or servers.

- Validation happens in `submit()`, in the caller's thread: an empty prompt, a prompt that does
  not fit the context, or absurd parameters raise `InvalidRequestError` for that request only.
- One engine step = one `BlockDecoder.step()`: one batched prefill forward over the prompts
  admitted and not yet prefilled (chunked, within a token budget), then one forward over the
  current block of every active request (see dlm/decode.py). Between steps the worker applies
  aborts and admits new requests into free cache rows (continuous batching: nobody waits for the
  batch to drain; requests admitted together are prefilled together). A new request goes to the
  free row that still holds the longest prefix of its prompt (exact caches: the previous turn of
  a call), and only the rest of its prompt is prefilled. Finished and
  aborted requests leave the decoder at once and cost no further compute; the remaining rows are
  compacted into fixed-size buckets, which is cheaper on CPU than computing masked-out rows.
- Owners: a request may name its `owner` (a call, an API request). `abort_owner(owner)` aborts
  every request of that owner wherever it is (waiting for a row, prefilling, decoding), so whoever
  ends a call need not know which of its requests are still alive. `load()` says what the engine
  holds now (rows, queue, requests by owner) for tests and /metrics; a request counts until its
  last delta is emitted. Admission is fair between owners: a free row goes to the waiting request
  whose owner holds the fewest rows (first come first served among equals), so one owner's burst
  cannot keep the others' requests out of the rows that free up. Of the free rows, a request
  takes the one whose cached prefix it reuses most (dlm/decode.py "Prefix reuse"), but a row
  cached by another owner counts EVICT_PENALTY_TOKENS less: a call whose prompts share nothing
  with anyone's (new instructions at every turn) takes empty rows and its own, and leaves other
  calls' cached histories in place for their next turn, while a long shared prefix (a chat API
  client re-sending a conversation) is still reused.
- Background owners: `set_background(owners)` names owners (calls that have used far more than
  their share lately: voice_agent/fair_share.py decides) whose requests yield to everyone
  else's: while any other request holds a row, their rows take no part in the steps (they keep
  their state and go on when the others are done), and a free row goes to another owner's request
  first. Work-conserving: alone, background requests run (in shorter prefill forwards, below), unless
  `pause_background(True)` says the others have work elsewhere (their speech being transcribed
  or synthesized on the same cores): then background rows sit out every step (the worker waits,
  polling its commands every PAUSE_POLL_S) until `pause_background(False)`. A step of background
  rows alone aims its prefill forward at BACKGROUND_PREFILL_STEP_S (dlm/decode.py's
  `prefill_step_s`, 0.3 s otherwise; once a prefill speed has been measured): the others' next
  request, or a pause, waits for that forward and the step's denoising forward at most (a step
  cannot be interrupted). `on_usage`, where set, is
  called from the worker after each step with what the step cost each named owner (seconds of
  the step's forwards, `BlockDecoder.step_seconds`); it must be quick and must not block.
- `hold_owner(owner, True)`: that owner's rows sit out the steps (keeping their state) until
  `hold_owner(owner, False)`: a voice call holds its reply while its first words are being
  synthesized on the same cores (the rest of the reply is not needed before they have played).
- Deltas carry text that is final: a block's tokens once the block is complete, and earlier the
  left-most contiguous committed part of the current block. Text is held back while it might be
  the start of a stop string or ends inside a UTF-8 sequence (`dlm.chat.TextStream`). A reply
  that a stop string or the loop guard ends stops at the token that ended its text, even where
  its last forward made later tokens final too: its token ids and `tokens` are then those of a
  one-token-a-step engine (the usage an API reports).
- Sharing: one Engine serves any number of callers and threads (`submit`, `abort`,
  `abort_owner`, `load` and `close` are thread-safe and never block on the worker; one worker thread runs the model). Engines on the same model (the dLLM and
  its AR baseline) are independent: each owns its KV cache, canvas and carry, and the model's
  forward writes none of its own state (dlm/decode.py "Sharing a model"). They do compete for
  the device: hold one Engine per model and let it batch.
- GPU: load the model in bfloat16 on CUDA (`load_model(..., device="cuda")`); attention is
  torch SDPA; shapes come from fixed buckets; `compile_mode` (off by default) compiles the
  denoising forward with torch.compile, "reduce-overhead" adding CUDA graphs.
- An exception while processing one request (its detokenization, stop strings, its callback)
  fails that request with finish_reason "error"; an exception in the prefill forward fails the
  requests being prefilled, one in the denoising forward the requests of that batch. The worker keeps running either way.
- `on_delta` is called from the worker thread: it must be quick and must not block.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dlm.chat import ChatFormatter, TextStream
from dlm.config import DiffusionSpec
from dlm.decode import BlockDecoder, DecodeSettings, PrefillError, RowUpdate, StepTrace, resolve_cache_mode
from dlm.errors import DlmError, InvalidRequestError
from dlm.policies import POLICIES
from dlm.threads import claim_for_engine

__all__ = ["Delta", "Engine", "EngineLoad", "GenerationParams", "RequestHandle", "StepTrace"]

log = logging.getLogger(__name__)

# Limits on request parameters: beyond these a request is refused, not clamped.
MAX_BLOCK_SIZE = 1024
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_PENDING_REQUESTS = 1024  # requests waiting for a free row; beyond: InvalidRequestError
# A free row cached by another owner is worth this many prompt tokens less to a request (a row's
# prefix is only kept while nobody else takes the row: see "Owners" above).
EVICT_PENALTY_TOKENS = 64
PAUSE_POLL_S = 0.01  # with every row paused (pause_background): how often the worker looks at its commands
BACKGROUND_PREFILL_STEP_S = 0.08  # a prefill forward of background rows alone aims at this long


@dataclass
class GenerationParams:
    max_new_tokens: int = 96  # generation stops with finish_reason "length" after this many tokens
    policy: str = "threshold"  # "threshold" | "fixed_steps" | "factor" (see dlm.policies)
    threshold: float | None = None  # Threshold policy's confidence bar; None: the checkpoint's
    factor: float = 1.0  # Factor policy's f (larger: more tokens per step)
    steps_per_block: int = 0  # FixedSteps: steps per block/sub-block; 0: the checkpoint's, else one per token
    block_size: int = 0  # tokens per block; 0: the checkpoint's
    sub_block_size: int = 0  # tokens per sub-block; 0: the checkpoint's (none: the whole block)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass; 1: off
    seed: int | None = None  # sampling seed; None: nondeterministic where temperature > 0
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first one
    trace_steps: bool = False  # also emit a StepTrace of the current block at every step
    draft_len: int = 0  # speculative engine: mask slots per draft block; 0: the engine's (others ignore it)
    # Speculative engine at temperature 0: a draft is accepted where the verifier gives it at least
    # `accept` times its top token's probability. 1 (default): exact, the AR replies token for token;
    # lower: more tokens per forward, other replies (lossy). Sampled rows and other engines ignore it.
    accept: float = 1.0
    loop_guard: bool = False  # stop a reply that repeats itself, finish_reason "repetition" (dlm.chat.LoopGuard)
    # Format-constrained decoding: makes this request's dlm.constraints.TokenConstraint (AR engines only).
    constraint: Callable[[], Any] | None = None


@dataclass
class Delta:
    text: str  # new final text (possibly empty)
    token_ids: list[int]  # new final token ids (EOS excluded)
    finished: bool = False  # True on the request's last delta
    finish_reason: str | None = None  # "eos" | "stop" | "repetition" | "length" | "abort" | "error" on the last delta
    error: str | None = None  # the error message where finish_reason == "error"
    steps: int = 0  # forward passes so far for this request (prefill included)
    tokens: int = 0  # generated tokens committed and final so far
    trace: StepTrace | None = None  # the current block after this step, where params.trace_steps
    prefill_steps: int = 0  # of `steps`, the forwards that prefilled the prompt
    eos_id: int | None = None  # the EOS id the model wrote (token_ids exclude it), where finish_reason == "eos"
    prefill_tokens: int = 0  # of `tokens`, those the prefill's forwards made (an AR reply's first, from its logits)


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds at one moment (`Engine.load()`)."""

    rows: int  # requests in cache rows (prefilling or decoding)
    queued: int  # requests submitted and not yet in a row
    owners: dict[str, int]  # requests held (rows + queued) by owner; requests without one under ""

    @property
    def idle(self) -> bool:
        return self.rows == 0 and self.queued == 0


class RequestHandle:
    """One request's stream of deltas. Iterating blocks until the next delta."""

    def __init__(self, request_id: str, engine: Engine) -> None:
        self.request_id = request_id
        self._engine = engine
        # Unbounded on purpose: reply text is never dropped, and a request produces at most
        # max_new_tokens + its steps deltas.
        self._deltas: queue.Queue[Delta] = queue.Queue()
        self.finish_reason: str | None = None  # set when the last delta is read
        self.error: str | None = None

    def __iter__(self) -> Iterator[Delta]:
        while self.finish_reason is None:
            delta = self._deltas.get()
            if delta.finished:
                self.finish_reason, self.error = delta.finish_reason, delta.error
            yield delta

    def result(self) -> str:
        """Block until the request ends; the whole text."""
        return "".join(d.text for d in self)

    def abort(self) -> None:
        self._engine.abort(self.request_id)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    settings: DecodeSettings
    handle: RequestHandle
    on_delta: Callable[[Delta], None] | None
    text: TextStream
    owner: str | None = None  # who may abort it wholesale (abort_owner): a call id, an API request
    slot: int | None = None  # cache row while active
    steps: int = 0
    tokens: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0


class Engine:
    """Continuous-batching block-diffusion engine; see the module docstring."""

    supports_constraints = False  # GenerationParams.constraint (dlm.constraints): the AR engines

    def __init__(self, loaded: Any, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 cache: str = "auto", compile_mode: str | None = None) -> None:
        """`loaded`: a `dlm.checkpoints.LoadedModel` (or anything with .model, .config, .spec,
        .tokenizer). `cache`: "auto" | "exact" | "none" | "prefix" | "dual" (dlm/decode.py).
        `compile_mode`: None (eager) or a `dlm.decode.COMPILE_MODES` mode for the denoising forward;
        the first steps at each new shape then pay for compilation."""
        self.model = loaded.model
        self.config = loaded.config
        self.spec: DiffusionSpec = self._engine_spec(loaded.spec)
        self.tokenizer = getattr(loaded, "tokenizer", None)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or self.config.max_seq_len
        self.cache = resolve_cache_mode(self.spec.attention, cache)  # fail here, not in the worker
        self.model.eval()
        self._decoder = self.make_decoder(max_batch_size=max_batch_size, max_seq_len=self.max_seq_len, cache=cache,
                                           compile_mode=compile_mode)
        # Unbounded, so that abort() never blocks; submissions are bounded by `_held` instead.
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._held: dict[str, _Request] = {}  # every request until its last delta (under _lock)
        self._pending: list[_Request] = []
        self._active: dict[int, _Request] = {}  # slot -> request
        self._slot_owner: dict[int, str | None] = {}  # slot -> the owner of its last request (worker only)
        self._ids = itertools.count()
        self._background: frozenset[str] = frozenset()  # set_background(); replaced whole, never mutated
        self._background_paused = False  # pause_background()
        self._held_owners: frozenset[str] = frozenset()  # hold_owner(); replaced whole under _lock
        self.on_usage: Callable[[dict[str, float]], None] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dlm-engine", daemon=True)
        self._thread.start()

    # -- hooks for the AR baseline -----------------------------------------------------------
    def _engine_spec(self, spec: DiffusionSpec) -> DiffusionSpec:
        if spec.attention != "causal" and spec.mask_token_id is None:
            raise DlmError(f"checkpoint family {spec.family!r} has no mask token: it cannot be diffusion-decoded")
        return spec

    def _force(self, params: GenerationParams) -> GenerationParams:
        return params

    def make_decoder(self, **kwargs: Any) -> BlockDecoder:
        return BlockDecoder(self.model, self.spec, **kwargs)

    # -- public API ----------------------------------------------------------------------------
    def submit(self, prompt: Sequence[dict] | Sequence[int], params: GenerationParams | None = None,
               on_delta: Callable[[Delta], None] | None = None, *, owner: str | None = None) -> RequestHandle:
        """Queue one request. `owner`: see `abort_owner`."""
        params = params or GenerationParams()
        prompt_ids, settings = self.prepare(prompt, params)
        with self._lock:
            if self._closed:
                raise DlmError("the engine is closed")
            if len(self._held) >= self.max_batch_size + MAX_PENDING_REQUESTS:
                raise InvalidRequestError(f"the engine has {MAX_PENDING_REQUESTS} requests waiting; try later")
            request_id = f"req-{next(self._ids)}"
            handle = RequestHandle(request_id, self)
            req = _Request(request_id, prompt_ids, settings, handle, on_delta,
                           TextStream(self.tokenizer, list(params.stop), loop_guard=params.loop_guard), owner=owner)
            self._held[request_id] = req
            self._commands.put(("submit", req))
        return handle

    def prepare(self, prompt: Sequence[dict] | Sequence[int], params: GenerationParams) -> tuple[list[int], DecodeSettings]:
        """What `submit` does in the caller's thread, without submitting: the prompt's token ids
        and the resolved `DecodeSettings`, or InvalidRequestError. For tools that drive a
        `dlm.decode.BlockDecoder` themselves (the profiler of `voice-agent bench llm`)."""
        params = self._force(params)
        prompt_ids = self._prompt_ids(prompt)
        return prompt_ids, self._settings(params, len(prompt_ids))

    def abort(self, request_id: str) -> None:
        """Takes effect between two steps; the request's last delta has finish_reason "abort"."""
        self._commands.put(("abort", request_id))

    def abort_owner(self, owner: str) -> None:
        """Abort every request of `owner` submitted before this call, wherever it is; takes
        effect between two steps, like `abort`."""
        self._commands.put(("abort_owner", owner))

    def set_background(self, owners: Collection[str]) -> None:
        """The owners whose requests yield to the others' from the next step on (see the module
        docstring, "Background owners"); replaces the previous set."""
        self._background = frozenset(owners)

    def pause_background(self, paused: bool) -> None:
        """True: background owners' rows sit out the steps even with no other request in a row
        (the others' work is elsewhere, e.g. their ASR and TTS); False: work-conserving again."""
        self._background_paused = bool(paused)

    def hold_owner(self, owner: str, held: bool) -> None:
        """Hold (True) or release (False) `owner`'s rows from the next step on (module docstring)."""
        with self._lock:
            self._held_owners = self._held_owners | {owner} if held else self._held_owners - {owner}

    def load(self) -> EngineLoad:
        """The requests held now: in rows, waiting, and by owner."""
        with self._lock:
            held = list(self._held.values())
        rows = sum(1 for r in held if r.slot is not None)
        owners = collections.Counter(r.owner or "" for r in held)
        return EngineLoad(rows=rows, queued=len(held) - rows, owners=dict(owners))

    def close(self) -> None:
        """Abort everything and stop the worker. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._commands.put(("close", None))
        self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation (caller's thread) ----------------------------------------------------------
    def _prompt_ids(self, prompt: Sequence[dict] | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a list of chat messages or of token ids, not a string")
        items = list(prompt)
        if not items:
            raise InvalidRequestError("empty prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            ids = items
        elif all(isinstance(m, dict) for m in items):
            ids = self._render_chat(items)
        else:
            raise InvalidRequestError("prompt must be a list of chat messages or of token ids")
        if not ids:
            raise InvalidRequestError("empty prompt")
        V = self.config.vocab_size
        if any(t < 0 or t >= V for t in ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {V})")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(f"prompt of {len(ids)} tokens does not fit the context of {self.max_seq_len}")
        return ids

    def _render_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: pass token ids, not chat messages")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError("each chat message needs a string 'role' and 'content'")
        # The checkpoint's template, with special-token text in contents escaped.
        return list(ChatFormatter(self.tokenizer, self.spec).encode(messages))

    def _settings(self, p: GenerationParams, prompt_len: int) -> DecodeSettings:
        spec = self.spec

        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid parameter: {msg}")

        if p.policy not in POLICIES:
            raise bad(f"policy {p.policy!r}; expected one of {sorted(POLICIES)}")
        if not isinstance(p.max_new_tokens, int) or not 1 <= p.max_new_tokens < self.max_seq_len:
            raise bad(f"max_new_tokens {p.max_new_tokens!r} must lie in [1, {self.max_seq_len})")
        block = p.block_size or spec.block_size
        if not 1 <= block <= MAX_BLOCK_SIZE:
            raise bad(f"block_size {p.block_size!r} must lie in [0, {MAX_BLOCK_SIZE}]")
        sub = p.sub_block_size or (spec.sub_block_size if not p.block_size else 0) or block
        if sub < 1 or block % sub:
            raise bad(f"sub_block_size {sub} must divide block_size {block}")
        threshold = spec.threshold if p.threshold is None else p.threshold
        if not 0.0 < threshold <= 1.0:
            raise bad(f"threshold {threshold!r} must lie in (0, 1]")
        if not 0.0 < p.factor <= 1e3:
            raise bad(f"factor {p.factor!r} must lie in (0, 1000]")
        steps = p.steps_per_block or spec.steps_per_block or sub
        if not 1 <= steps <= sub:
            raise bad(f"steps_per_block {steps} must lie in [1, {sub}] (tokens per (sub-)block)")
        if not 0.0 <= p.temperature <= MAX_TEMPERATURE:
            raise bad(f"temperature {p.temperature!r} must lie in [0, {MAX_TEMPERATURE}]")
        if not 0.0 < p.top_p <= 1.0:
            raise bad(f"top_p {p.top_p!r} must lie in (0, 1]")
        if not isinstance(p.draft_len, int) or not 0 <= p.draft_len <= MAX_BLOCK_SIZE:
            raise bad(f"draft_len {p.draft_len!r} must lie in [0, {MAX_BLOCK_SIZE}]")
        if not isinstance(p.accept, (int, float)) or not 0.0 < p.accept <= 1.0:
            raise bad(f"accept {p.accept!r} must lie in (0, 1]")
        if len(p.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in p.stop):
            raise bad(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        if p.constraint is not None and not self.supports_constraints:
            raise bad("constraint: this engine does not decode under a grammar (the AR engines do)")
        settings = DecodeSettings(
            block_size=block, sub_block_size=sub, max_new_tokens=p.max_new_tokens,
            policy=POLICIES[p.policy], threshold=threshold, factor=p.factor, steps_per_block=steps,
            temperature=p.temperature, top_p=p.top_p, seed=p.seed, trace=p.trace_steps, draft_len=p.draft_len,
            accept=float(p.accept), constraint=p.constraint() if p.constraint is not None else None,
        )
        need = self._decoder.required_len(prompt_len, settings)
        if need > self.max_seq_len:
            raise InvalidRequestError(
                f"prompt of {prompt_len} tokens + max_new_tokens {p.max_new_tokens} (the positions its decoding "
                f"needs: {need}) exceeds the context of {self.max_seq_len}")
        return settings

    # -- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        claim_for_engine()  # this thread's share of the cores (dlm.threads)
        with torch.inference_mode():
            waiting = False  # every row held back (pause_background, hold_owner): nothing to step
            while True:
                idle = not self._active and not self._pending
                if not self._drain(block=idle, timeout=PAUSE_POLL_S if waiting else None):
                    break
                self._admit()
                held, brief = self._held_back()
                waiting = bool(self._active) and len(held) == len(self._active)
                if self._active and not waiting:
                    self._step(held, brief)
        for req in [*self._pending, *self._active.values()]:
            self._finish(req, "abort")
        self._pending.clear()
        self._active.clear()

    def _drain(self, block: bool, timeout: float | None = None) -> bool:
        """Apply queued commands (`timeout`: wait at most this long for the first one, whatever
        `block` says); False once closed."""
        while True:
            try:
                cmd, arg = self._commands.get(block=block or timeout is not None, timeout=timeout)
            except queue.Empty:
                return True
            block, timeout = False, None
            if cmd == "close":
                return False
            if cmd == "submit":
                self._pending.append(arg)
            elif cmd == "abort":
                self._abort(lambda req, request_id=arg: req.request_id == request_id)
            elif cmd == "abort_owner":
                self._abort(lambda req, owner=arg: req.owner == owner)

    def _abort(self, match: Callable[[_Request], bool]) -> None:
        """Abort every pending or active request that `match`es."""
        for req in [r for r in self._pending if match(r)]:
            self._pending.remove(req)
            self._finish(req, "abort")
        for slot, req in list(self._active.items()):
            if match(req):
                self._release(slot)
                self._finish(req, "abort")

    def _admit(self) -> None:
        free = [s for s in range(self.max_batch_size) if s not in self._active]
        while self._pending and free:
            # Fair between owners: the first waiting request of an owner holding the fewest rows,
            # background owners' last.
            rows = collections.Counter(r.owner for r in self._active.values() if r.owner is not None)
            background = self._background
            req = min(self._pending, key=lambda r: (r.owner in background, rows[r.owner] if r.owner is not None else 0))
            self._pending.remove(req)
            # The free row holding the longest prefix of this prompt (a previous turn of the same
            # call): only the rest is prefilled. Another owner's row counts less (_reuse_score).
            slot = max(free, key=lambda s: self._reuse_score(s, req))
            free.remove(slot)
            try:
                self._decoder.add(slot, req.prompt_ids, req.settings)
            except Exception as e:
                log.exception("request %s failed at admission", req.request_id)
                self._decoder.remove(slot)
                free.append(slot)
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                continue
            req.slot = slot
            self._active[slot] = req
            self._slot_owner[slot] = req.owner

    def _reuse_score(self, slot: int, req: _Request) -> int:
        """What `req` gains from the free `slot`: the prompt positions it reuses there, less
        EVICT_PENALTY_TOKENS where the row holds another (named) owner's cached prefix (the module
        docstring, "Owners"). Ties go to the lowest slot."""
        score = self._decoder.prefix_match(slot, req.prompt_ids, req.settings)
        owner = self._slot_owner.get(slot)
        if owner is not None and owner != req.owner and slot in self._decoder.cached:
            score -= EVICT_PENALTY_TOKENS
        return score

    def _release(self, slot: int) -> None:
        self._decoder.remove(slot)
        self._active.pop(slot, None)

    def _held_back(self) -> tuple[set[int], bool]:
        """The slots that sit out this step: held owners' rows, and background owners' rows while
        any other request's row steps or the others' work elsewhere has paused them; and whether
        the rows that step are background owners' alone (their prefill is brief)."""
        holding = self._held_owners
        held = {slot for slot, req in self._active.items() if req.owner in holding} if holding else set()
        background = self._background
        if not background:
            return held, False
        behind = {slot for slot, req in self._active.items() if req.owner in background}
        if len(held | behind) < len(self._active) or self._background_paused:
            return held | behind, False
        return held, bool(behind - held)

    def _report_usage(self) -> None:
        if self.on_usage is None:
            return
        usage: dict[str, float] = {}
        for slot, seconds in self._decoder.step_seconds.items():
            owner = self._slot_owner.get(slot)
            if owner is not None:
                usage[owner] = usage.get(owner, 0.0) + seconds
        if usage:
            try:
                self.on_usage(usage)
            except Exception:
                log.exception("on_usage failed")

    def _step(self, held: set[int], brief: bool) -> None:
        """One step of every row but the `held` ones, with brief prefill forwards where `brief`
        (both from `_held_back()`)."""
        try:
            updates = self._decoder.step(held, BACKGROUND_PREFILL_STEP_S if brief else None)
        except PrefillError as e:  # the requests being prefilled fail; the others keep going
            log.exception("prefill failed; failing the requests being prefilled")
            for slot in e.slots:
                req = self._active.pop(slot, None)
                if req is not None:
                    self._finish(req, "error", error=str(e))
            return
        except Exception as e:
            log.exception("engine step failed; failing the requests of this batch")
            for slot, req in list(self._active.items()):
                self._release(slot)
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            return
        finally:
            self._report_usage()
        for update in updates:
            req = self._active.get(update.slot)
            if req is None:
                continue
            try:
                self._apply(req, update)
            except Exception as e:
                log.exception("request %s failed", req.request_id)
                self._release(update.slot)
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _apply(self, req: _Request, u: RowUpdate) -> None:
        req.steps, req.tokens, req.prefill_steps = u.steps, u.tokens, u.prefill_steps
        finish, ids = u.finish_reason, u.new_ids
        text, stopped = req.text.push(ids, final=finish is not None)
        if stopped:
            finish = req.text.finish_reason  # a stop string or a loop
            # The reply ends at the token that ended its text, as a one-token-a-step engine's does.
            req.tokens -= len(ids) - req.text.taken
            ids = ids[: req.text.taken]
        if u.steps <= u.prefill_steps:  # made by the prefill's forwards
            req.prefill_tokens += len(ids)
        if finish is not None:
            self._release(u.slot)
            self._emit(req, Delta(text, ids, True, finish, None, u.steps, req.tokens, u.trace, u.prefill_steps,
                                  u.eos_id if finish == "eos" else None, req.prefill_tokens), callback_errors=False)
        elif text or ids or u.trace is not None:
            self._emit(req, Delta(text, ids, steps=u.steps, tokens=req.tokens, trace=u.trace,
                                  prefill_steps=u.prefill_steps, prefill_tokens=req.prefill_tokens))

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        self._emit(req, Delta("", [], True, reason, error, req.steps, req.tokens, prefill_steps=req.prefill_steps,
                              prefill_tokens=req.prefill_tokens), callback_errors=False)

    def _emit(self, req: _Request, delta: Delta, callback_errors: bool = True) -> None:
        if delta.finished:
            with self._lock:
                self._held.pop(req.request_id, None)
        req.handle._deltas.put(delta)
        if req.on_delta is not None:
            try:
                req.on_delta(delta)
            except Exception:
                if callback_errors:
                    raise
                log.exception("on_delta of %s failed", req.request_id)
