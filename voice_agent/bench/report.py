"""Figures of the end-to-end benchmark: percentiles, per-stage breakdown, table, JSON, PNG.

Contract:
- `stage_durations(result)` splits one turn's latency into consecutive stages, in ms:
  endpointing (client: last voiced sample sent -> `speech_stopped`; Realtime only), ASR (-> the
  server's final transcript), LLM (-> first LLM text), TTS (-> first synthesized audio) and
  delivery (-> the first reply audio at the client: pacing, socket, client). The server's
  milestones are ms from its own end-of-speech estimate, which is taken to coincide with the
  client's last voiced sample (they differ by the VAD's frame, 20 ms). A stage that ended before
  the previous one (the LLM started speculatively before the final transcript) counts as 0.
- `summarize(results)` groups turns by (route, config, callers) into `Summary`s with p50, p95 and
  max; failed turns count in `failures` and are left out of the percentiles. `chunk_to_audio_ms`
  is the server's own: the reply's first chunk of text final (handed to TTS) -> its first audio
  sent (`chunk_to_audio_ms(result)`).
- `format_table(summaries)` is the text table; `write_json(path, document)`; `plot(path, summaries,
  results)` draws the PNG (latency distribution per configuration, stacked p50 stages).
- `evaluate_goals(summaries, gpu)` checks the project's latency goals; they are reported, not asserted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.bench.callers import TurnResult

__all__ = [
    "STAGES",
    "Goal",
    "Summary",
    "chunk_to_audio_ms",
    "evaluate_goals",
    "format_table",
    "percentiles",
    "plot",
    "stage_durations",
    "summarize",
    "write_json",
]

# Stage name -> what ends it.
STAGES = {
    "endpointing": "speech_stopped received (client)",
    "asr": "final transcript (server)",
    "llm": "first LLM text (server)",
    "tts": "first synthesized audio (server)",
    "delivery": "first reply audio received (client)",
}
_COLORS = {"endpointing": "#9e9e9e", "asr": "#4c72b0", "llm": "#dd8452", "tts": "#55a868", "delivery": "#8172b3"}
_CONFIG_COLORS = ["#dd8452", "#4c72b0", "#55a868", "#c44e52", "#8172b3"]


def percentiles(values: Iterable[float | None]) -> dict[str, float | None]:
    """p50, p95 (linear interpolation) and max of the values that are not None."""
    xs = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if xs.size == 0:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    return {
        "p50": round(float(np.percentile(xs, 50)), 1),
        "p95": round(float(np.percentile(xs, 95)), 1),
        "max": round(float(xs.max()), 1),
        "n": int(xs.size),
    }


def stage_durations(result: TurnResult) -> dict[str, float | None]:
    """Consecutive stage durations of one turn in ms (see the module docstring)."""
    server = result.server or {}
    milestones = [
        ("endpointing", result.endpoint_ms),
        ("asr", server.get("asr_final_ms")),
        ("llm", server.get("llm_first_text_ms")),
        ("tts", server.get("tts_first_audio_ms")),
        ("delivery", result.voice_to_voice_ms),
    ]
    durations: dict[str, float | None] = {}
    reached = 0.0
    for name, at in milestones:
        if name == "delivery" and server.get("tts_first_audio_ms") is None:
            at = None  # without the server's milestones the whole latency is not "delivery"
        if at is None or not result.ok:
            durations[name] = None
            continue
        durations[name] = round(max(0.0, at - reached), 1)
        reached = max(reached, at)
    return durations


def chunk_to_audio_ms(result: TurnResult) -> float | None:
    """The reply's first chunk of text final -> its first audio sent, both on the server's clock."""
    server = result.server or {}
    chunk, sent = server.get("tts_first_chunk_ms"), server.get("voice_to_voice_ms")
    return None if chunk is None or sent is None or not result.ok else round(sent - chunk, 1)


def llm_stage_ms(result: TurnResult) -> float | None:
    """Final transcript -> first LLM text (negative where a speculative start got ahead)."""
    server = result.server or {}
    asr, llm = server.get("asr_final_ms"), server.get("llm_first_text_ms")
    return None if asr is None or llm is None or not result.ok else round(llm - asr, 1)


@dataclass
class Summary:
    route: str
    config: str
    callers: int
    turns: int
    failures: int
    voice_to_voice_ms: dict[str, float | None]  # client side: p50, p95, max, n
    stages_ms: dict[str, dict[str, float | None]]  # stage -> p50, p95, max, n
    llm_stage_ms: dict[str, float | None]  # final transcript -> first LLM text
    server_voice_to_voice_ms: dict[str, float | None]  # server side: its end of speech -> first audio sent
    chunk_to_audio_ms: dict[str, float | None]  # server: the first chunk of text final -> its first audio sent
    speculative: dict[str, int] = field(default_factory=dict)  # result -> turns
    tokens_per_forward: float | None = None  # over the turns that report it
    failure_reasons: dict[str, int] = field(default_factory=dict)


def summarize(results: list[TurnResult]) -> list[Summary]:
    groups: dict[tuple[str, str, int], list[TurnResult]] = {}
    for r in results:
        groups.setdefault((r.route, r.config, r.callers), []).append(r)
    summaries = []
    for (route, config, callers), turns in groups.items():
        ok = [r for r in turns if r.ok]
        stages = [stage_durations(r) for r in ok]
        speculative: dict[str, int] = {}
        for r in ok:
            kind = str((r.server or {}).get("speculative", "unknown"))
            speculative[kind] = speculative.get(kind, 0) + 1
        tokens = sum((r.server or {}).get("tokens") or 0 for r in ok)
        passes = sum((r.server or {}).get("forward_passes") or 0 for r in ok)
        reasons: dict[str, int] = {}
        for r in turns:
            if not r.ok:
                reason = (r.error or "unknown").split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        summaries.append(
            Summary(
                route=route,
                config=config,
                callers=callers,
                turns=len(turns),
                failures=len(turns) - len(ok),
                voice_to_voice_ms=percentiles(r.voice_to_voice_ms for r in ok),
                stages_ms={name: percentiles(s[name] for s in stages) for name in STAGES},
                llm_stage_ms=percentiles(llm_stage_ms(r) for r in ok),
                server_voice_to_voice_ms=percentiles((r.server or {}).get("voice_to_voice_ms") for r in ok),
                chunk_to_audio_ms=percentiles(chunk_to_audio_ms(r) for r in ok),
                speculative=speculative,
                tokens_per_forward=round(tokens / passes, 3) if passes else None,
                failure_reasons=reasons,
            )
        )
    summaries.sort(key=lambda s: (s.route, s.callers, s.config != "dllm", s.config))
    return summaries


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(summaries: list[Summary]) -> str:
    """One line per (route, config, callers): voice-to-voice and p50 stage durations, in ms."""
    head = (
        f"{'route':<8} {'config':<7} {'callers':>7} {'turns':>5} {'fail':>4} | {'v2v p50':>7} {'p95':>6} {'max':>6} | "
        f"{'endpt':>6} {'asr':>6} {'llm':>6} {'tts':>6} {'deliv':>6} | {'llm stage p50':>13} {'tok/fwd':>7} | "
        f"{'chunk>audio p50':>15} {'p95':>5}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        v, st = s.voice_to_voice_ms, s.stages_ms
        lines.append(
            f"{s.route:<8} {s.config:<7} {s.callers:>7} {s.turns:>5} {s.failures:>4} | "
            f"{_ms(v['p50']):>7} {_ms(v['p95']):>6} {_ms(v['max']):>6} | "
            + " ".join(f"{_ms(st[name]['p50']):>6}" for name in STAGES)
            + f" | {_ms(s.llm_stage_ms['p50']):>13} {s.tokens_per_forward if s.tokens_per_forward is not None else '-':>7}"
            + f" | {_ms(s.chunk_to_audio_ms['p50']):>15} {_ms(s.chunk_to_audio_ms['p95']):>5}"
        )
    lines.append(
        "ms; v2v = last voiced sample sent -> first reply audio received (client); stage columns are p50 durations: "
        "endpointing (client, Realtime only), ASR, LLM first text, TTS first audio, delivery; "
        "llm stage = final transcript -> first LLM text (p50, negative with a speculative start); "
        "chunk>audio = the reply's first chunk of text final -> its first audio sent (server)"
    )
    return "\n".join(lines)


@dataclass
class Goal:
    goal: str
    value: float | None  # the measured figure
    target: float
    met: bool | None  # None where not measured


def _find(summaries: list[Summary], route: str, config: str, callers: int) -> Summary | None:
    return next((s for s in summaries if (s.route, s.config, s.callers) == (route, config, callers)), None)


def evaluate_goals(summaries: list[Summary], *, gpu: bool, diffusion: bool = True) -> list[Goal]:
    """The issue's goals on the Realtime route (reported even when missed). Where the 'dllm'
    configuration is not a diffusion model (`diffusion=False`: the AR fallback), the speed-up
    goal is reported with its value but not judged (`met` None)."""
    goals = []

    def check(text: str, value: float | None, target: float, at_most: bool = True) -> None:
        met = None if value is None else (value <= target if at_most else value >= target)
        goals.append(Goal(text, value, target, met))

    one = _find(summaries, "realtime", "dllm", 1) or _find(summaries, "realtime", "target", 1)
    if gpu:
        check("GPU, 1 caller: p50 voice-to-voice <= 300 ms", one.voice_to_voice_ms["p50"] if one else None, 300)
        sixteen = _find(summaries, "realtime", "dllm", 16) or _find(summaries, "realtime", "target", 16)
        check("GPU, 16 callers: p95 voice-to-voice <= 500 ms", sixteen.voice_to_voice_ms["p95"] if sixteen else None, 500)
    else:
        check("CPU, 1 caller: p50 voice-to-voice <= 800 ms", one.voice_to_voice_ms["p50"] if one else None, 800)
    ar = _find(summaries, "realtime", "ar", 1)
    ratio = None
    if one is not None and ar is not None and one.config == "dllm":
        d, a = one.llm_stage_ms["p50"], ar.llm_stage_ms["p50"]
        if d is not None and a is not None and d > 0:
            ratio = round(a / d, 2)
    text = "1 caller: LLM stage (p50) with the dLLM >= 1.5x faster than with the AR baseline"
    if diffusion:
        check(text, ratio, 1.5, at_most=False)
    else:
        goals.append(Goal(text + " (not judged: 'dllm' fell back to the AR model)", ratio, 1.5, None))
    tier = _find(summaries, "realtime", "tier", 1)
    if tier is not None:
        local = _find(summaries, "realtime", "dllm", 1)
        hop = None
        if local is not None and tier.voice_to_voice_ms["p50"] is not None and local.voice_to_voice_ms["p50"] is not None:
            hop = round(tier.voice_to_voice_ms["p50"] - local.voice_to_voice_ms["p50"], 1)
        check("1 caller: p50 voice-to-voice through the LLM tier minus in-process <= 30 ms", hop, 30)
    return goals


def write_json(path: Path, document: dict[str, Any]) -> None:
    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serializable: {type(o).__name__}")

    path.write_text(json.dumps(document, indent=1, default=default) + "\n", encoding="utf-8")


def plot(path: Path, summaries: list[Summary], results: list[TurnResult], *, title: str = "") -> None:
    """The PNG: per route, the distribution of voice-to-voice latency per configuration (box
    plot with every turn as a dot) and the stacked p50 stage durations."""
    import matplotlib

    matplotlib.use("Agg")  # no display; set here, not at import time
    import matplotlib.pyplot as plt

    routes = sorted({s.route for s in summaries})
    configs = sorted({s.config for s in summaries}, key=lambda c: (c != "dllm", c))
    color = {c: _CONFIG_COLORS[i % len(_CONFIG_COLORS)] for i, c in enumerate(configs)}
    fig, axes = plt.subplots(len(routes), 2, figsize=(11, 3.6 * len(routes)), squeeze=False)
    for row, route in enumerate(routes):
        mine = [s for s in summaries if s.route == route]
        labels = [f"{s.config}\n{s.callers} caller{'s' if s.callers > 1 else ''}" for s in mine]
        ax = axes[row][0]
        data = []
        for s in mine:
            xs = [r.voice_to_voice_ms for r in results if (r.route, r.config, r.callers) == (s.route, s.config, s.callers) and r.ok]
            data.append([x / 1000 for x in xs] or [math.nan])
        boxes = ax.boxplot(data, whis=(5, 95), showfliers=False, patch_artist=True, widths=0.6)
        for patch, s in zip(boxes["boxes"], mine, strict=True):
            patch.set_facecolor(color[s.config])
            patch.set_alpha(0.45)
        rng = np.random.default_rng(0)
        for i, (xs, s) in enumerate(zip(data, mine, strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(xs)), xs, s=7, color=color[s.config], zorder=3)
            if s.failures:
                ax.annotate(f"{s.failures} failed", (i, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7, color="#c44e52")
        ax.set_xticks(range(1, len(mine) + 1), labels, fontsize=7)
        ax.set_ylabel("voice-to-voice (s)")
        ax.set_title(f"{route}: last voiced sample -> first reply audio (box p5-p95)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax = axes[row][1]
        bottom = np.zeros(len(mine))
        for name in STAGES:
            values = np.array([(s.stages_ms[name]["p50"] or 0.0) / 1000 for s in mine])
            if not values.any():
                continue
            ax.bar(range(len(mine)), values, bottom=bottom, color=_COLORS[name], label=name, width=0.6)
            bottom += values
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.set_ylabel("p50 stage duration (s)")
        ax.set_title(f"{route}: per-stage breakdown (medians, stacked)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
