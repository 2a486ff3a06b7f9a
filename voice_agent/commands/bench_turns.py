"""`voice-agent bench turns`: how long each end-of-turn detector waits, and how often it cuts in.

Runs every detector setting over the labelled turn set of `voice_agent.bench.turns` (complete
sentences, and the same sentences with a 400-1200 ms pause spliced in at a word boundary; piper
and espeak-ng voices), through the real endpointer as a call runs it (the [vad] settings):
- "silence" at each `--silence-ms`: the turn ends after that much silence;
- the judged detectors at each `--checks-ms` x `--max-silence-ms`: each pause of the check length
  is judged, and the turn ends at once if the verdict says over, else after the max silence.
  "smart-turn" (Smart Turn v3.2) and "prosody" (our head on whisper's encoder, audio/prosody.py,
  `turn.model` or the shipped one) at each `--thresholds`, on the audio; "text" at each
  `--text-thresholds` (the configured ASR transcribes the pause's audio, the [turn] text model
  scores the transcript); "smart-turn+text" and "prosody+text" at each pair (the session's rule:
  their odds multiplied, `voice_agent.end_of_turn.decide`). The models really run, once per
  pause; a verdict lands as many milliseconds later in the audio as it took (ASR then text score;
  the longer of that and the audio model for both, which run side by side in a call).
  The text detectors also at each `--unsure-silence-ms` (the configured turn.unsure_silence_ms
  added; 0: off): a pause whose transcript whisper was unsure of (below turn.unsure_logprob)
  ends the turn after that much silence when its verdict is not "over".
Per setting: the median (and p95) wait from the caller's last word to the end of the turn over
the complete items, and the share of paused items cut off (the turn ended before their last
word); also complete items cut at a natural pause. The bar (issue "turn-taking latency"): median
wait <= 250 ms with at most 5 % of the paused utterances cut off. Writes a table, JSON and a
plot of the trade-off (`--out`, `--tag`); the configured [turn] setting is always included.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
from pathlib import Path
from typing import Any

from voice_agent.config import AUDIO_TURN_MODELS, TURN_DETECTORS, Config, audio_turn_model, turn_models

HELP = "end-of-turn detectors on a labelled turn set: wait after complete turns vs paused ones cut off"

WAIT_BAR_MS = 250.0
CUT_BAR = 0.05


def _ints(text: str, *, off: bool = False) -> list[int]:
    """Comma-separated milliseconds, each at least 20 (or 0 where `off`: the rule switched off)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 20 and not (off and v == 0) for v in values):
        raise argparse.ArgumentTypeError(f"expected milliseconds of at least 20{' or 0' if off else ''}, got {text!r}")
    return values


def _probabilities(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds are probabilities in [0, 1], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--silence-ms", type=_ints, default=[300, 400, 500, 600, 800, 1000, 1300],
                        help="silence-only settings (default: 300,400,500,600,800,1000,1300)")
    parser.add_argument("--checks-ms", type=_ints, default=[100, 200, 300],
                        help="judged detectors: pause lengths judged by the models (default: 100,200,300)")
    parser.add_argument("--thresholds", type=_probabilities, default=[0.3, 0.5, 0.7, 0.9],
                        help="smart-turn, prosody: P(turn over) that ends the turn (default: 0.3,0.5,0.7,0.9)")
    parser.add_argument("--text-thresholds", type=_probabilities, default=[0.001, 0.003, 0.01, 0.03, 0.1],
                        help="text: score that ends the turn (default: 0.001,0.003,0.01,0.03,0.1)")
    parser.add_argument("--max-silence-ms", type=_ints, default=[1500],
                        help="judged detectors: the fallback silence (default: 1500)")
    parser.add_argument("--unsure-silence-ms", type=functools.partial(_ints, off=True), default=[0],
                        help="text detectors: the shorter silence after a transcript whisper was unsure of "
                             "(turn.unsure_silence_ms; 0: off; the configured value is always added; default: 0)")
    parser.add_argument("--detectors", default=",".join(TURN_DETECTORS), help=f"which detectors to run (default: all, {','.join(TURN_DETECTORS)})")
    parser.add_argument("--voices-per-sentence", type=int, default=2,
                        help="recordings per sentence, each in another voice (default: 2: 48 complete + 48 paused items)")
    parser.add_argument("--cache-dir", default="~/.cache/voice-agent/bench-turns", help="where the turn set is kept")
    parser.add_argument("--out", default="runs/bench-turns", help="folder for the JSON, PNG and table (default: runs/bench-turns)")
    parser.add_argument("--tag", default="turns", help="file name stem of the outputs (default: turns)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")


def summarize(detector: str, setting: dict[str, Any], outcomes: dict[str, str | float], kinds: dict[str, str]) -> dict[str, Any]:
    """One row of the table from the per-item outcomes of one setting."""
    complete = [o for i, o in outcomes.items() if kinds[i] == "complete"]
    paused = [o for i, o in outcomes.items() if kinds[i] == "paused"]
    from voice_agent.bench.report import percentiles

    waits = percentiles(o for o in complete if isinstance(o, float))
    cut_paused = sum(o == "cut" for o in paused) / len(paused) if paused else None
    median = waits["p50"]
    return {
        "detector": detector,
        "setting": setting,
        "complete": len(complete),
        "paused": len(paused),
        "median_wait_ms": median,
        "p95_wait_ms": waits["p95"],
        "paused_cut_share": cut_paused,
        "complete_cut_share": sum(o == "cut" for o in complete) / len(complete) if complete else None,
        "missed": sum(o == "missed" for o in outcomes.values()),
        "meets_bar": median is not None and cut_paused is not None and median <= WAIT_BAR_MS and cut_paused <= CUT_BAR,
    }


def _setting_text(row: dict[str, Any]) -> str:
    s = row["setting"]
    if row["detector"] == "silence":
        return f"{s['end_silence_ms']} ms"
    if "threshold" in s and "text_threshold" in s:  # both: their odds multiplied (end_of_turn.decide)
        over = f"p {s['threshold']:g} x text {s['text_threshold']:g}"
    else:
        over = " & ".join(f"{name}>={s[key]:g}" for name, key in (("p", "threshold"), ("text", "text_threshold")) if key in s)
    unsure = f", unsure {s['unsure_silence_ms']}" if s.get("unsure_silence_ms") else ""
    return f"check {s['check_ms']}, {over}, max {s['max_silence_ms']}{unsure}"


def format_table(rows: list[dict[str, Any]], configured: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:5.1f}%"

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:6.0f}"

    lines = [f"{'detector':<15} {'setting':<40} {'wait p50':>8} {'p95':>6} | {'paused cut':>10} {'complete cut':>12} {'missed':>6}  bar",
             "-" * 110]
    for row in rows:
        mark = "met" if row["meets_bar"] else ""
        if row["detector"] == configured["detector"] and row["setting"] == configured["setting"]:
            mark += " (configured)"
        lines.append(f"{row['detector']:<15} {_setting_text(row):<40} {ms(row['median_wait_ms']):>8} {ms(row['p95_wait_ms']):>6} | "
                     f"{pct(row['paused_cut_share']):>10} {pct(row['complete_cut_share']):>12} {row['missed']:>6}  {mark}")
    lines.append(f"wait = caller's last word -> end of turn (ms), over complete items; paused cut = share of paused "
                 f"items whose turn ended before their last word. Bar: wait p50 <= {WAIT_BAR_MS:.0f} ms with paused cut "
                 f"<= {100 * CUT_BAR:.0f}%. \"p A x text T\": over when (text / T) x (odds(p) / odds(A)) >= 1.")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    silence = [r for r in rows if r["detector"] == "silence" and r["median_wait_ms"] is not None]
    ax.plot([100 * r["paused_cut_share"] for r in silence], [r["median_wait_ms"] for r in silence], "o-", color="gray",
            label="silence only")
    for r in silence:
        ax.annotate(f"{r['setting']['end_silence_ms']}", (100 * r["paused_cut_share"], r["median_wait_ms"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", color="gray")
    judged = [r for r in rows if r["detector"] != "silence" and r["median_wait_ms"] is not None]
    groups = sorted({(r["detector"], r["setting"]["check_ms"], r["setting"]["max_silence_ms"]) for r in judged})
    for group, marker in zip(groups, "s^vD<>ph*xP+12348", strict=False):
        points = sorted((r for r in judged if (r["detector"], r["setting"]["check_ms"], r["setting"]["max_silence_ms"]) == group),
                        key=lambda r: (r["paused_cut_share"], r["median_wait_ms"]))
        ax.plot([100 * r["paused_cut_share"] for r in points], [r["median_wait_ms"] for r in points], marker=marker, ls=":",
                label=f"{group[0]}: check {group[1]} ms, max {group[2]} ms (points: thresholds)")
    ax.axhline(WAIT_BAR_MS, color="green", lw=0.8, ls="--")
    ax.axvline(100 * CUT_BAR, color="green", lw=0.8, ls="--")
    ax.set_xlabel("paused utterances cut off (%)")
    ax.set_ylabel("median wait after a complete turn (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, config: Config) -> int:
    from audio.prosody import ProsodyTurn
    from audio.turn import SmartTurn
    from voice_agent.bench import report
    from voice_agent.bench.turns import build_turn_set, first_end_s, outcome
    from voice_agent.commands._audio_setup import load_transcriber, make_endpointer
    from voice_agent.commands.bench_e2e import _machine
    from voice_agent.end_of_turn import load_text_scorer
    from voice_agent.errors import UserError
    from voice_agent.models import EMBEDDED_ASR, resolve_asr_model, resolve_tts_voice, resolve_turn_model

    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if not detectors or any(d not in TURN_DETECTORS for d in detectors):
        raise UserError(f"--detectors takes some of {', '.join(TURN_DETECTORS)}, not {args.detectors!r}")
    if args.voices_per_sentence < 1:
        raise UserError("--voices-per-sentence must be at least 1")
    if min(args.checks_ms) >= min(args.max_silence_ms):
        raise UserError("every --checks-ms value must be below the --max-silence-ms values")
    turn = config.turn
    if turn.detector == "silence":
        configured = {"detector": "silence", "setting": {"end_silence_ms": config.vad.end_silence_ms}}
    else:
        configured = {"detector": turn.detector, "setting": _judged_setting(turn.detector, turn.check_silence_ms, turn.threshold,
                                                                             turn.text_threshold, turn.max_silence_ms,
                                                                             turn.unsure_silence_ms)}
        if turn.detector not in detectors:
            detectors.append(turn.detector)
    silences = sorted(set(args.silence_ms) | ({config.vad.end_silence_ms} if turn.detector == "silence" else set()))
    checks = sorted(set(args.checks_ms) | {turn.check_silence_ms})
    thresholds = sorted(set(args.thresholds) | {turn.threshold})
    text_thresholds = sorted(set(args.text_thresholds) | {turn.text_threshold})
    max_silences = sorted(set(args.max_silence_ms) | {turn.max_silence_ms})
    unsure_silences = sorted(set(args.unsure_silence_ms) | {turn.unsure_silence_ms})

    def progress(done: int, total: int) -> None:
        if not args.no_progress and (done == total or done % 8 == 0):
            print(f"  turn set: {done}/{total} recordings", file=sys.stderr, flush=True)

    cache_dir = Path(args.cache_dir).expanduser()
    print(f"building the turn set (piper + espeak-ng, cut with whisper word times) in {cache_dir} ...", file=sys.stderr, flush=True)
    transcriber = functools.cache(lambda: load_transcriber(config))  # loaded once, where it is needed
    items = build_turn_set(cache_dir, resolve_tts_voice(config.tts.voice), transcriber, args.voices_per_sentence, progress)
    kinds = {item.item_id: item.kind for item in items}
    # turn.model names the configured detector's audio model; the other one runs its bundled file.
    def model_file(name: str) -> Any:
        return resolve_turn_model(turn.model if audio_turn_model(turn.detector) == name else "", name)

    audio_models: dict[str, Any] = {}
    if any(audio_turn_model(d) == "smart-turn" for d in detectors):
        audio_models["smart-turn"] = SmartTurn(model_file("smart-turn"), threads=turn.threads)
    if any(audio_turn_model(d) == "prosody" for d in detectors):
        audio_models["prosody"] = ProsodyTurn(resolve_asr_model(EMBEDDED_ASR), model_file("prosody"), threads=turn.threads)
    scorer = load_text_scorer(turn.text_model, device=config.llm.device) if any("text" in turn_models(d) for d in detectors) else None

    def endpointer(**overrides: Any) -> Any:
        return make_endpointer(config, 16_000, **overrides)

    rows: list[dict[str, Any]] = []
    per_item: dict[str, dict[str, Any]] = {}
    if "silence" in detectors:
        for silence in silences:
            outcomes = {i.item_id: outcome(i, first_end_s(i, endpointer, end_silence_ms=silence)) for i in items}
            rows.append(summarize("silence", {"end_silence_ms": silence}, outcomes, kinds))
            per_item[f"silence {silence}"] = outcomes

    # The models' scores and times of each check, computed once: (item, check_ms, k) -> scores.
    scores: dict[tuple[str, int, int], dict[str, float]] = {}
    model_ms: dict[str, list[float]] = {**{name: [] for name in AUDIO_TURN_MODELS}, "asr": [], "text": []}

    def scored(item_id: str, check: int, k: int, audio: Any, need: str) -> dict[str, float]:
        entry = scores.setdefault((item_id, check, k), {})
        name = audio_turn_model(need)
        if name is not None and f"{name}_p" not in entry:
            t = time.perf_counter()
            entry[f"{name}_p"] = audio_models[name].probability(audio)
            entry[f"{name}_s"] = time.perf_counter() - t
            model_ms[name].append(1000 * entry[f"{name}_s"])
        if "text" in turn_models(need) and "text_p" not in entry:
            t = time.perf_counter()
            heard = transcriber().transcribe(audio)
            entry["transcript"], entry["asr_logprob"] = str(heard), heard.avg_logprob
            asr_s = time.perf_counter() - t
            t = time.perf_counter()
            entry["text_p"] = scorer.probability(entry["transcript"])
            text_s = time.perf_counter() - t
            entry["text_s"] = asr_s + text_s
            model_ms["asr"].append(1000 * asr_s)
            model_ms["text"].append(1000 * text_s)
        return entry

    grids = {
        "smart-turn": [(t, None) for t in thresholds],
        "text": [(None, t) for t in text_thresholds],
        "smart-turn+text": [(a, t) for a in thresholds for t in text_thresholds],
    }
    grids["prosody"], grids["prosody+text"] = grids["smart-turn"], grids["smart-turn+text"]
    started = time.monotonic()
    for detector in (d for d in TURN_DETECTORS if d != "silence" and d in detectors):  # the table's order
        for check in checks:
            if not args.no_progress:
                print(f"  {detector} at {check} ms pauses, {time.monotonic() - started:.0f} s so far", file=sys.stderr, flush=True)
            for threshold, text_threshold in grids[detector]:
                for max_silence in max_silences:
                    for unsure in unsure_silences if "text" in turn_models(detector) else [0]:
                        if unsure >= max_silence:
                            continue
                        outcomes = {}
                        for item in items:
                            verdict = functools.partial(_verdict, scored, item.item_id, check, detector, threshold,
                                                        text_threshold, unsure, turn.unsure_logprob)
                            end = first_end_s(item, endpointer, end_silence_ms=max_silence, check_ms=check, verdict=verdict)
                            outcomes[item.item_id] = outcome(item, end)
                        setting = _judged_setting(detector, check, threshold, text_threshold, max_silence, unsure)
                        rows.append(summarize(detector, setting, outcomes, kinds))
                        per_item[f"{detector} {_setting_text(rows[-1])}"] = outcomes

    configured_row = next(r for r in rows if r["detector"] == configured["detector"] and r["setting"] == configured["setting"])
    passing = [r for r in rows if r["meets_bar"]]
    best = min(passing, key=lambda r: r["median_wait_ms"]) if passing else None
    lines = [format_table(rows, configured), ""]
    for name, values in model_ms.items():
        if values:
            spread = report.percentiles(values)
            lines.append(f"{name} time per judged pause: p50 {spread['p50']:.0f} ms, p95 {spread['p95']:.0f} ms ({spread['n']} runs)")
    lines.append(f"configured [turn] ({configured['detector']}, {_setting_text(configured_row)}): "
                 f"{'meets' if configured_row['meets_bar'] else 'MISSES'} the bar")
    lines.append(f"best setting that meets the bar: {best['detector']} {_setting_text(best)}, wait p50 {best['median_wait_ms']:.0f} ms, "
                 f"paused cut {100 * best['paused_cut_share']:.1f}%" if best else "no setting meets the bar")
    text = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.tag
    machine = _machine()
    document = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["voice-agent", *sys.argv[1:]]) if sys.argv else None,
        "machine": machine,
        "vad": {"backend": config.vad.backend, "aggressiveness": config.vad.aggressiveness, "frame_ms": config.vad.frame_ms},
        "asr": {"model": config.asr.model, "audio_context": config.asr.audio_context},
        "text_model": turn.text_model,
        "configured": configured,
        "bar": {"median_wait_ms": WAIT_BAR_MS, "paused_cut_share": CUT_BAR},
        "model_ms": model_ms,
        "rows": rows,
        "items": [item.label for item in items],
        "scores": [{"item": i, "check_ms": c, "k": k, **v} for (i, c, k), v in scores.items()],
        "outcomes": per_item,
    }
    report.write_json(stem.with_suffix(".json"), document)
    (stem.with_suffix(".txt")).write_text(text + "\n", encoding="utf-8")
    plot(stem.with_suffix(".png"), rows, f"voice-agent bench turns: {len(items)} items ({machine['cpu']}, "
                                         f"{machine['cpu_count']} cores)")
    print(text)
    print(f"wrote {stem}.json, {stem}.png, {stem}.txt", file=sys.stderr)
    return 0


def _verdict(scored: Any, item_id: str, check: int, detector: str, threshold: float | None, text_threshold: float | None,
             unsure_ms: int, unsure_logprob: float, k: int, audio: Any) -> tuple[bool, float, int]:
    """(over, seconds the verdict took, the shorter silence of an unsure transcript or 0) of the
    k-th judged pause of an item, from cached scores (the session's rule: services.unsure_silence_ms)."""
    from voice_agent.end_of_turn import decide, unsure_silence_ms

    e = scored(item_id, check, k, audio, detector)
    name = audio_turn_model(detector)
    audio_p = e[f"{name}_p"] if threshold is not None else None
    text_p = e["text_p"] if text_threshold is not None else None
    over = decide(audio_p, text_p, threshold or 0.0, text_threshold or 0.0)
    seconds = max(e[f"{name}_s"] if audio_p is not None else 0.0, e["text_s"] if text_p is not None else 0.0)
    return over, seconds, unsure_silence_ms(e.get("asr_logprob") if text_p is not None else None, unsure_logprob, unsure_ms)


def _judged_setting(detector: str, check: int, threshold: float | None, text_threshold: float | None, max_silence: int,
                    unsure_silence: int = 0) -> dict[str, Any]:
    setting: dict[str, Any] = {"check_ms": check}
    if audio_turn_model(detector) is not None:
        setting["threshold"] = threshold
    if "text" in turn_models(detector):
        setting["text_threshold"] = text_threshold
    setting["max_silence_ms"] = max_silence
    if "text" in turn_models(detector):
        setting["unsure_silence_ms"] = unsure_silence
    return setting
