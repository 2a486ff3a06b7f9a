"""`voice-agent calls`: list the stored calls, or show one call's turns."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from voice_agent.config import Config
from voice_agent.errors import UserError

HELP = "list stored calls, or show one (voice-agent calls CALL_ID)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("call_id", nargs="?", help="show this call (a unique prefix is enough)")
    parser.add_argument("--limit", type=int, default=20, help="how many calls to list (default 20)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.store import get_call, list_calls

    if not config.store.path:
        raise UserError("the call store is disabled (store.path is empty)")
    path = Path(config.store.path).expanduser()
    if not path.exists():
        raise UserError(f"no call store at {path} yet: calls are stored once `voice-agent serve` has taken one")
    if args.call_id:
        call = get_call(path, args.call_id)
        if call is None:
            raise UserError(f"no single call matches {args.call_id!r}")
        if args.json:
            print(json.dumps(call, indent=2))
            return 0
        print(f"call {call['call_id']}  {call['route']}  {_when(call['started_at'])} -> {_when(call['ended_at'])}")
        for turn in call["turns"]:
            m = turn["metrics"]
            print(f"\n[{turn['turn_id']}] {turn['kind']} ({turn['status']})")
            print(f"  user:  {turn['user_text']}")
            print(f"  heard: {turn['heard']}")
            if turn["reply_text"].strip() != turn["heard"].strip():
                print(f"  generated: {turn['reply_text']}")
            stages = ("asr_final_ms", "llm_first_text_ms", "tts_first_audio_ms", "voice_to_voice_ms")
            shown = "  ".join(f"{k.removesuffix('_ms')}={m[k]:.0f}ms" for k in stages if m.get(k) is not None)
            print(f"  {shown}  speculative={m.get('speculative')}  tokens/pass={m.get('tokens_per_forward')}")
        return 0
    calls = list_calls(path, args.limit)
    if args.json:
        print(json.dumps(calls, indent=2))
        return 0
    if not calls:
        print("no calls stored yet")
        return 0
    print(f"{'call':<18} {'route':<9} {'started':<19} {'ended':<19} turns")
    for c in calls:
        print(f"{c['call_id']:<18} {c['route']:<9} {_when(c['started_at']):<19} {_when(c['ended_at']):<19} {c['turns']}")
    return 0
