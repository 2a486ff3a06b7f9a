"""Process-wide counters and latency histograms, rendered as Prometheus text for `/metrics`.

Contract: `Metrics` is fed by the server (calls, rejections, protocol errors) and by every
finished turn (`turn_finished`, the session's sink interface); `render()` returns the text
exposition format (version 0.0.4). No client library: a handful of counters does not need one.
All methods run on the event loop thread.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

__all__ = ["LATENCY_BUCKETS_S", "STAGES", "WORK_HELP", "Metrics"]

# Per-turn stages measured from the end of the user's speech (keys of TurnMetrics.values).
STAGES = {
    "asr_final_ms": "final_transcript",
    "llm_first_text_ms": "first_llm_text",
    "tts_first_chunk_ms": "first_tts_chunk",
    "tts_first_audio_ms": "first_tts_audio",
    "voice_to_voice_ms": "first_audio_sent",
}
# Gauges of the work in progress on the shared models (ModelServices.work()), and the server's heap trim.
WORK_HELP = {
    "llm_rows": "LLM requests in engine rows (prefilling or decoding).",
    "llm_queued": "LLM requests waiting for an engine row.",
    "llm_owners": "Calls or API requests holding LLM requests.",
    "asr_running": "ASR decodes running on the model (0 or 1).",
    "asr_waiting": "ASR decodes waiting for the model.",
    "tts_jobs": "Speech syntheses running or waiting for the voice.",
    "turn_checks": "End-of-turn model runs in progress or waiting.",
    "heap_trim": "The clean-up after the last call (0 or 1): waiting for the models' work to drain, then a "
                 "garbage collection and the C heap's free pages handed back.",
}
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.calls_total: Counter[str] = Counter()  # by route
        self.calls_rejected: Counter[str] = Counter()  # by reason
        self.calls_active = 0
        self.turns_total: Counter[str] = Counter()  # by status
        self.errors_total: Counter[str] = Counter()  # by kind
        self.speculative_total: Counter[str] = Counter()  # by result
        self.llm_finishes_total: Counter[str] = Counter()  # by finish reason
        self.tokens_total = 0
        self.forward_passes_total = 0
        self._latency = {stage: _Histogram() for stage in STAGES.values()}

    def turn_finished(self, call_id: str, record: Any) -> None:
        self.turns_total[record.status] += 1
        values = record.metrics
        for key, stage in STAGES.items():
            ms = values.get(key)
            if ms is not None and ms >= 0:
                self._latency[stage].observe(ms / 1000)
        if record.status == "failed":
            self.errors_total[values.get("error") or "turn_failed"] += 1  # llm_error, asr_error, tts_error
        if values.get("llm_finish"):
            self.llm_finishes_total[values["llm_finish"]] += 1
        if values.get("speculative") not in (None, "off"):
            self.speculative_total[values["speculative"]] += 1
        if values.get("tokens") and values.get("forward_passes"):
            self.tokens_total += values["tokens"]
            self.forward_passes_total += values["forward_passes"]

    def error(self, kind: str) -> None:
        self.errors_total[kind] += 1

    def render(self, work: dict[str, int] | None = None) -> str:
        """`work`: the services' work in progress (`ModelServices.work()`), rendered as gauges."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        # Counters with one label: (name, help, label, counts by label value).
        labelled = (
            ("voice_agent_calls_total", "Calls accepted, by route.", "route", self.calls_total),
            ("voice_agent_calls_rejected_total", "Calls refused, by reason.", "reason", self.calls_rejected),
            ("voice_agent_turns_total", "Finished turns, by status.", "status", self.turns_total),
            ("voice_agent_errors_total", "Errors, by kind.", "kind", self.errors_total),
            ("voice_agent_speculative_starts_total", "Speculative LLM starts, by result.", "result", self.speculative_total),
            ("voice_agent_llm_finishes_total", "LLM replies by why they ended (repetition: the loop guard stopped one).",
             "reason", self.llm_finishes_total),
        )
        for name, help_text, label, counts in labelled:
            family(name, "counter", help_text)
            for value, n in sorted(counts.items()):
                lines.append(f'{name}{{{label}="{value}"}} {n}')
        family("voice_agent_calls_active", "gauge", "Calls in progress.")
        lines.append(f"voice_agent_calls_active {self.calls_active}")
        family("voice_agent_llm_tokens_total", "counter", "Reply tokens of turns whose backend reports forward passes.")
        lines.append(f"voice_agent_llm_tokens_total {self.tokens_total}")
        family("voice_agent_llm_forward_passes_total", "counter", "LLM forward passes (tokens per pass = tokens / passes).")
        lines.append(f"voice_agent_llm_forward_passes_total {self.forward_passes_total}")
        for key, value in sorted((work or {}).items()):
            family(f"voice_agent_work_{key}", "gauge", WORK_HELP.get(key, "Work in progress."))
            lines.append(f"voice_agent_work_{key} {value}")
        name = "voice_agent_stage_latency_seconds"
        family(name, "histogram", "Time from the end of the user's speech to each stage of a turn.")
        for stage, h in self._latency.items():
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), h.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{name}_bucket{{stage="{stage}",le="{le}"}} {cumulative}')
            lines.append(f'{name}_sum{{stage="{stage}"}} {h.total:.6f}')
            lines.append(f'{name}_count{{stage="{stage}"}} {h.n}')
        return "\n".join(lines) + "\n"
