"""The models shared by every call of one process: ASR, TTS, the LLM client, VAD settings.

Contract:
- `ModelServices.load(config, api_key=...)` loads the models (seconds; call it from a thread or
  before the event loop starts). It logs loudly when the LLM is an AR fallback.
- `await transcribe(audio_16k, priority=AsrPriority.FINAL, on_start=None)` and
  `await synthesize(text)` run the blocking model in a worker thread, one call at a time per
  model: faster-whisper and piper are not reentrant, and on a small CPU two concurrent decodes
  only slow each other down. ASR requests queue in a `PriorityGate`: every call's finals go
  before any speculative or partial decode (whisper pads its input to 30 s, so each decode costs
  the same ~0.7 s, 2 s or more on a loaded CPU, however short the audio). `on_start()` runs on
  the event loop when the decode leaves the queue. Cancelling the await is safe: a queued
  request leaves the queue; a model call already in its thread runs to its end (the model stays
  taken until then) and its result is discarded. `asr_decode_s`: a moving average of the
  model's decode time (0.0 before the first), for the speculative start's decision.
- TTS requests queue in a first-come gate of their own on the event loop, for the same reason: a
  request cancelled while it waits (a barge-in, a hang-up) leaves the queue at once instead of
  holding a worker thread until the voice is free. Each call synthesizes one sentence at a time,
  so the calls take turns.
- `work()` says what the shared models are doing now (LLM rows and queue from the client's
  `load()`, ASR decodes running and waiting, TTS syntheses running or waiting for the voice), for
  /metrics, /healthz and the tests that check no work outlives its call.
- End of turn (`[turn]`): the detector's models are loaded once (Smart Turn for "smart-turn",
  the prosody head on whisper's encoder for "prosody", the text scorer's chat LM for "text").
  `await end_of_turn(audio_16k, transcript)` returns a `TurnVerdict`: the audio model on the
  audio and/or the text scorer on `await transcript()` (the
  session's speculative decode), each model in a worker thread, one call at a time (first come;
  a cancelled request leaves the queue), judged by `voice_agent.end_of_turn.decide` with the
  [turn] thresholds. `end_silence_ms` is the silence after which a turn ends without a verdict
  (`turn.max_silence_ms`; `vad.end_silence_ms` for "silence"); `judges_turns` says whether there
  is a detector at all. `unsure_silence_ms(transcript)`: the shorter silence for a pause whose
  transcript whisper was unsure of (`turn.unsure_logprob`, `turn.unsure_silence_ms`; 0: none).
- `make_endpointer()`, `make_chunker()`, `make_resampler()` build the per-call state (the main
  endpointer emits a `PauseCheck` at each `turn.check_silence_ms` pause when a turn model is
  loaded); a chunker serves one reply (its first chunk may end at a clause or a phrase start:
  `tts.first_chunk_min_words`, `tts.first_chunk_max_words`, `tts.first_chunk_max_syllables`).
- A call's own turn detection (`make_endpointer(vad=VadSettings)`, Realtime's session setting):
  `silence_duration_ms` is the silence that ends a turn (with a detector: the fallback after
  which it ends without a verdict); semantic VAD's `eagerness` scales that silence instead (low
  x2, medium and auto x1, high x0.5; `turn_silence_ms` says what it comes to); `threshold`, a
  speech probability, picks the VAD's aggressiveness (0.3, 0.4, 0.5, 0.6 -> 0..3, as silero maps
  them); `prefix_padding_ms` is the audio kept before the start of speech.
- `synthesize(text, speed=1.0)`: `speed` > 1 speaks faster (piper's length scale divided by it).
- Fair share between calls (`share`, a `voice_agent.fair_share.CallShare` built from
  `agent.busy_call_cpus` / `agent.busy_call_half_life_s`): `transcribe`, `synthesize` and
  `end_of_turn` take the call's id as `owner`; each job's time in its thread is charged to it, a
  call in the background waits before the gate while another call has work in flight, and a
  local engine (`attach_share`) charges its steps and holds back background calls' rows. The
  session joins the ledger when the call starts and leaves it when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.config import Config, audio_turn_model, turn_models
from voice_agent.events import VadSettings
from voice_agent.fair_share import CallShare
from voice_agent.llm import LlmClient, build_llm
from voice_agent.transcription import AsrPriority, PriorityGate

__all__ = ["EAGERNESS_SCALE", "ModelServices", "vad_aggressiveness"]

log = logging.getLogger(__name__)

# Semantic VAD's eagerness -> a factor on the silence that ends a turn without a verdict.
EAGERNESS_SCALE = {"low": 2.0, "medium": 1.0, "auto": 1.0, "high": 0.5}
MIN_TURN_SILENCE_MS = 100


def gguf_conversions(config: Config) -> dict[Path, set[bool]]:
    """The GGUFs that `ModelServices.load(config)` reads, each with the conversions its loads read
    (dlm.gguf_file `cached_gguf`'s `dense`: True, the whole float32 one, for a dense or int4 load;
    False, the small one, for a block format): what install.sh makes ahead of the first `serve`."""
    from dlm.checkpoints import reads_dense_conversion
    from voice_agent.end_of_turn import text_scorer_format
    from voice_agent.llm import load_format
    from voice_agent.models import resolve_llm_model

    loads = []
    if config.llm.backend == "local":
        resolved = resolve_llm_model(config.llm.model)
        loads.append((resolved, load_format(resolved, device=config.llm.device, dtype=config.llm.dtype,
                                            weights=config.llm.weights)[1]))
    if "text" in turn_models(config.turn.detector):
        resolved = resolve_llm_model(config.turn.text_model)
        loads.append((resolved, text_scorer_format(resolved, config.llm.device)[1]))
    out: dict[Path, set[bool]] = {}
    for resolved, weights in loads:
        if resolved.path.suffix == ".gguf":
            out.setdefault(resolved.path, set()).add(reads_dense_conversion(weights))
    return out


def vad_aggressiveness(threshold: float) -> int:
    """A speech-probability threshold -> the VAD's aggressiveness 0..3 (0.3, 0.4, 0.5, 0.6)."""
    return int(min(3, max(0, round((threshold - 0.3) / 0.1))))


class ModelServices:
    def __init__(self, config: Config, *, transcriber: Any, synthesizer: Any, llm: LlmClient, turn_model: Any = None,
                 text_scorer: Any = None) -> None:
        self.config = config
        self.llm = llm
        self.partial_interval_ms = config.asr.partial_interval_ms
        self._turn_model = turn_model  # audio.turn.SmartTurn or audio.prosody.ProsodyTurn, or None
        self._text_scorer = text_scorer  # voice_agent.end_of_turn.TextTurnScorer, or None
        self.judges_turns = turn_model is not None or text_scorer is not None
        self.end_silence_ms = config.turn.max_silence_ms if self.judges_turns else config.vad.end_silence_ms
        # One model run at a time each: a gate is held until its worker thread is done.
        self._turn_gate = PriorityGate()
        self._text_gate = PriorityGate()
        self._transcriber = transcriber
        self._synthesizer = synthesizer
        self._asr_gate = PriorityGate()  # the order of ASR requests (event loop)
        self._asr_lock = threading.Lock()  # the model itself, whoever calls it
        self.asr_decode_s = 0.0
        self._tts_gate = PriorityGate()  # the order of TTS requests (event loop)
        self._tts_lock = threading.Lock()  # the voice itself, whoever calls it
        self._tts_jobs = 0  # syntheses in a thread: running or waiting for the voice
        self._tts_jobs_lock = threading.Lock()
        self.share = CallShare(config.agent.busy_call_cpus, config.agent.busy_call_half_life_s)
        attach = getattr(llm, "attach_share", None)  # a local engine yields its rows too
        if attach is not None:
            attach(self.share)

    @classmethod
    def load(cls, config: Config, *, api_key: str = "") -> ModelServices:
        from audio.asr import Transcriber
        from audio.tts import Synthesizer
        from voice_agent.models import resolve_asr_model, resolve_tts_voice

        transcriber = Transcriber(
            resolve_asr_model(config.asr.model),
            device=config.asr.device,
            compute_type=config.asr.compute_type,
            language=config.asr.language,
            beam_size=config.asr.beam_size,
            cpu_threads=config.asr.cpu_threads,
            audio_context=config.asr.audio_context,
        )
        synthesizer = Synthesizer(resolve_tts_voice(config.tts.voice), length_scale=config.tts.length_scale)
        turn_model = text_scorer = None
        audio_model = audio_turn_model(config.turn.detector)
        if audio_model == "smart-turn":
            from audio.turn import SmartTurn
            from voice_agent.models import resolve_turn_model

            turn_model = SmartTurn(resolve_turn_model(config.turn.model), threads=config.turn.threads)
        elif audio_model == "prosody":
            from audio.prosody import ProsodyTurn
            from voice_agent.models import EMBEDDED_ASR, resolve_asr_model, resolve_turn_model

            turn_model = ProsodyTurn(resolve_asr_model(EMBEDDED_ASR), resolve_turn_model(config.turn.model, "prosody"),
                                     threads=config.turn.threads)
        llm = build_llm(config.llm, api_key=api_key)
        if "text" in turn_models(config.turn.detector):
            from voice_agent.end_of_turn import load_text_scorer

            try:  # on the local LLM's weights where they are the ones it would load (no second copy)
                text_scorer = load_text_scorer(config.turn.text_model, device=config.llm.device,
                                               share=getattr(llm, "loaded", None))
            except BaseException:
                if callable(close := getattr(llm, "close", None)):  # no engine left running behind the error
                    close()
                raise
        log.info("models ready: ASR %s, TTS %s, LLM %s, end of turn %s", config.asr.model, config.tts.voice, llm.name,
                 config.turn.detector)
        return cls(config, transcriber=transcriber, synthesizer=synthesizer, llm=llm, turn_model=turn_model,
                   text_scorer=text_scorer)

    def _transcribe_blocking(self, audio_16k: np.ndarray) -> str:
        with self._asr_lock:
            started = time.perf_counter()
            text = self._transcriber.transcribe(audio_16k)
            took_s = time.perf_counter() - started
            self.asr_decode_s = took_s if self.asr_decode_s == 0.0 else 0.7 * self.asr_decode_s + 0.3 * took_s
            return text

    def _synthesize_blocking(self, job: tuple[str, float]) -> np.ndarray:
        text, speed = job
        with self._tts_jobs_lock:
            self._tts_jobs += 1
        try:
            with self._tts_lock:
                if speed == 1.0:
                    return self._synthesizer.synthesize(text)
                return self._synthesizer.synthesize(text, length_scale=self.config.tts.length_scale / speed)
        finally:
            with self._tts_jobs_lock:
                self._tts_jobs -= 1

    async def _text_turn(self, transcript: Callable[[], Awaitable[str]], owner: str | None) -> float:
        return await self._in_thread(self._text_gate, self._text_scorer.probability, await transcript(), owner=owner)

    async def end_of_turn(self, audio_16k: np.ndarray, transcript: Callable[[], Awaitable[str]], *,
                          owner: str | None = None) -> Any:
        """Is the caller's turn over, given the utterance so far? (see the module docstring)"""
        from voice_agent.end_of_turn import TurnVerdict, decide

        if not self.judges_turns:
            raise RuntimeError("no end-of-turn model is loaded (turn.detector = \"silence\")")

        async def nothing() -> None:
            return None

        audio_p, text_p = await asyncio.gather(
            self._in_thread(self._turn_gate, self._turn_model.probability, audio_16k, owner=owner)
            if self._turn_model is not None else nothing(),
            self._text_turn(transcript, owner) if self._text_scorer is not None else nothing(),
        )
        turn = self.config.turn
        return TurnVerdict(decide(audio_p, text_p, turn.threshold, turn.text_threshold), audio_p, text_p)

    def work(self) -> dict[str, int]:
        """Work in progress on the shared models (see the module docstring)."""
        load = self.llm.load()
        return {
            "llm_rows": load.rows if load is not None else 0,
            "llm_queued": load.queued if load is not None else 0,
            "llm_owners": len(load.owners) if load is not None else 0,
            "asr_running": int(self._asr_lock.locked()),
            "asr_waiting": self._asr_gate.waiting(),
            "tts_jobs": self._tts_jobs + self._tts_gate.waiting(),
            "turn_checks": sum(int(gate.held) + gate.waiting() for gate in (self._turn_gate, self._text_gate)),
        }

    async def transcribe(
        self,
        audio_16k: np.ndarray,
        *,
        priority: AsrPriority = AsrPriority.FINAL,
        on_start: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> str:
        return await self._in_thread(self._asr_gate, self._transcribe_blocking, audio_16k, priority, on_start, owner=owner)

    async def synthesize(self, text: str, speed: float = 1.0, *, owner: str | None = None) -> tuple[np.ndarray, int]:
        """Cancelling it is safe: a queued request leaves the queue; one already in its thread runs
        to its end and its result is discarded."""
        samples = await self._in_thread(self._tts_gate, self._synthesize_blocking, (text, speed), owner=owner)
        return samples, self._synthesizer.sample_rate_hz

    def _llm_owners(self) -> dict[str, int]:
        load = self.llm.load()
        return load.owners if load is not None else {}

    async def _in_thread(self, gate: PriorityGate, fn: Callable[[Any], Any], arg: Any, priority: int = 0,
                         on_start: Callable[[], None] | None = None, *, owner: str | None = None) -> Any:
        """`fn(arg)` in a worker thread once `gate` lets it through; the gate is released when the
        thread is done, not when the awaiting task is cancelled. A call in the background
        (`share`) waits before the gate while another call has work; the job's time is charged
        to `owner`."""
        share = self.share
        while True:
            await share.wait_turn(owner, self._llm_owners)
            share.begin(owner)
            try:
                await gate.acquire(priority)
            except BaseException:
                share.end(owner)
                raise
            if owner is None or not share.must_wait(owner, self._llm_owners()):
                break
            # Another call's work came while this one queued at the gate: it goes first.
            gate.release()
            share.end(owner)

        def charged(arg: Any) -> Any:
            started = time.monotonic()
            try:
                return fn(arg)
            finally:
                if owner is not None:
                    share.charge(owner, time.monotonic() - started)

        def done(_: Any) -> None:
            gate.release()
            share.end(owner)

        try:
            if on_start is not None:
                on_start()
            job = asyncio.get_running_loop().run_in_executor(None, charged, arg)
        except BaseException:
            done(None)
            raise
        job.add_done_callback(done)
        return await asyncio.shield(job)

    def unsure_silence_ms(self, transcript: str) -> int:
        """The shorter silence that ends a turn whose transcript so far whisper was unsure of
        (its mean log-probability per token below turn.unsure_logprob: garbled words, which the
        text score cannot judge); 0 where it was sure, or the rule is off."""
        from voice_agent.end_of_turn import unsure_silence_ms

        turn = self.config.turn
        # an audio.asr.Transcript's confidence; a plain str has none
        return unsure_silence_ms(getattr(transcript, "avg_logprob", None), turn.unsure_logprob, turn.unsure_silence_ms)

    def turn_silence_ms(self, vad: VadSettings | None) -> int:
        """The silence that ends a turn without a verdict, under a call's turn detection."""
        if vad is None:
            return self.end_silence_ms
        if vad.silence_duration_ms is not None:
            return max(MIN_TURN_SILENCE_MS, vad.silence_duration_ms)
        scale = EAGERNESS_SCALE.get(vad.eagerness or "auto", 1.0)
        return max(MIN_TURN_SILENCE_MS, round(self.end_silence_ms * scale))

    def make_endpointer(self, end_silence_ms: int | None = None, *, vad: VadSettings | None = None) -> Any:
        """The call's endpointer (under the call's turn detection `vad`, see the module
        docstring); with `end_silence_ms`, a plain one with that silence (no pause checks: the
        speculative start's)."""
        from voice_agent.commands._audio_setup import make_endpointer

        if end_silence_ms is not None:
            return make_endpointer(self.config, 16_000, end_silence_ms=end_silence_ms)
        checks = self.config.turn.check_silence_ms if self.judges_turns else 0
        overrides = {}
        if vad is not None and vad.threshold is not None:
            overrides["aggressiveness"] = vad_aggressiveness(vad.threshold)
        if vad is not None and vad.prefix_padding_ms is not None:
            overrides["pre_roll_ms"] = vad.prefix_padding_ms
        return make_endpointer(self.config, 16_000, end_silence_ms=self.turn_silence_ms(vad), check_silence_ms=checks,
                               **overrides)

    def make_chunker(self) -> Any:
        from audio.text import SentenceChunker

        tts = self.config.tts
        return SentenceChunker(max_chars=tts.max_sentence_chars, first_chunk_min_words=tts.first_chunk_min_words,
                               first_chunk_max_words=tts.first_chunk_max_words,
                               first_chunk_max_syllables=tts.first_chunk_max_syllables)

    def make_resampler(self, from_hz: int, to_hz: int) -> Any:
        from audio.resample import LiveResampler

        return LiveResampler(from_hz, to_hz)  # a call's audio: what a filter holds back is latency

    async def aclose(self) -> None:
        await self.llm.aclose()
