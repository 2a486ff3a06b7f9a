"""Configuration loading: defaults, unknown keys, wrong types, --set overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from voice_agent.config import Config, ConfigError, LlmConfig, default_config_text, load_config


def test_default_toml_matches_the_dataclass_defaults() -> None:
    # configs/default.toml is the documented copy of the defaults; the two must not drift.
    loaded = load_config()
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.name in ("source", "secrets"):
            continue
        assert getattr(loaded, section.name) == getattr(defaults, section.name), section.name


def test_every_default_key_is_in_default_toml() -> None:
    import tomllib

    data = tomllib.loads(default_config_text())
    for section in dataclasses.fields(Config):
        if section.name in ("source", "secrets"):
            continue
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        missing = keys - set(data.get(section.name, {}))
        # Long texts (the system prompt) may stay in the dataclass only.
        missing -= {"system_prompt"}
        assert not missing, f"[{section.name}] is missing {sorted(missing)} in configs/default.toml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[llm]\nfoo = 1\n", "unknown key 'llm.foo'"),
        ("[nosuch]\nx = 1\n", "unknown key 'nosuch'"),
        ("[server]\nport = \"80\"\n", "server.port: expected int"),
        ("[server]\nport = true\n", "server.port: expected int"),
        ("[server]\nallowed_origins = \"x\"\n", "server.allowed_origins: expected a list"),
        ("[server]\nallowed_origins = [1]\n", "server.allowed_origins[0]: expected str"),
        ("llm = 3\n", "llm: expected a [llm] table"),
        ("[llm\n", "not valid TOML"),
        ("[llm]\nweights = \"int3\"\n", "llm.weights must be one of 'auto', 'dense', 'int4', 'blocks', 'blocks-amx', 'blocks-bf16', 'blocks-int8', 'blocks-int16', not 'int3'"),
        ("[llm]\nkv_cache = \"bfloat16\"\n", "llm.kv_cache must be one of 'auto', 'float32', 'float16', not 'bfloat16'"),
        ("[llm]\naccept = 0\n", "llm.accept must lie in .0, 1.* not 0.0$"),
        ("[llm]\naccept = 1.5\n", "llm.accept must lie in .0, 1.* not 1.5$"),
        ("[llm]\ndraft_confidence = 1\n", "llm.draft_confidence must lie in .0, 1. .0: always draft_len., not 1.0$"),
        ("[llm]\ndraft_confidence = -0.1\n", "llm.draft_confidence must lie in .0, 1."),
        ("[llm]\ndraft_len = 1000\n", "llm.draft_len must lie in .0, 16. .0: the model's default., not 1000$"),
        ("[llm]\ndraft_len = -3\n", "llm.draft_len must lie in .0, 16."),
        ("[llm]\nprompt_lookup = -1\n", "llm.prompt_lookup must lie in .0, 32. .0: off"),
        ("[llm]\ndraft_branches = 0\n", "llm.draft_branches must lie in .1, 8. .1: a chain of drafts., not 0$"),
        ("[llm]\ndraft_branches = 2.5\n", "llm.draft_branches: expected int"),
        ("[llm]\nrow_cost = \"high\"\n", "llm.row_cost must be \"auto\" or a number in .0, 16. .0: no budget., not 'high'"),
        ("[llm]\nrow_cost = -0.5\n", "llm.row_cost must be \"auto\" or a number in .0, 16."),
        ("[vad]\nconfirm_start = \"smart-turn\"\n", "vad.confirm_start must be \"silero\" or \"\" .off., not 'smart-turn'"),
        ("[turn]\nthreshold = 1.0\n", "turn.detector 'prosody.text' multiplies the two scores' odds"),
        ("[turn]\ndetector = \"smart-turn+text\"\ntext_threshold = 0.0\n", "turn.text_threshold above 0"),
        ("[turn]\ndetector = \"prosody\"\nthreshold = 1.5\n", "turn.threshold must be in .0, 1."),
        ("[turn]\ndetector = \"nosuch\"\n", "turn.detector must be one of .*'prosody\\+text'"),
        ("[tts]\nfirst_chunk_max_syllables = -1\n", "tts.first_chunk_max_syllables must be >= 0"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path)


def test_the_draft_confidence_and_prompt_lookup_defaults_are_the_engines() -> None:
    from dlm.speculative import DEFAULT_HEAD_DRAFT_CONFIDENCE, DEFAULT_PROMPT_LOOKUP

    assert load_config().llm.draft_confidence == LlmConfig().draft_confidence == DEFAULT_HEAD_DRAFT_CONFIDENCE
    assert load_config().llm.prompt_lookup == LlmConfig().prompt_lookup == DEFAULT_PROMPT_LOOKUP


def test_int_is_accepted_for_float() -> None:
    config = load_config(overrides=["llm.threshold=1"])
    assert config.llm.threshold == 1.0 and isinstance(config.llm.threshold, float)


def test_set_overrides() -> None:
    config = load_config(overrides=["llm.device=cuda", "server.port=9000", "agent.speculative_start=false"])
    assert config.llm.device == "cuda"
    assert config.server.port == 9000
    assert config.agent.speculative_start is False
    # A bare word that is not TOML is taken as a string.
    assert load_config(overrides=["asr.model=base.en"]).asr.model == "base.en"


@pytest.mark.parametrize("bad", ["llm.device", "device=cpu", "a.b.c=1", "llm.nosuch=1", "server.port=x"])
def test_bad_overrides(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_config(overrides=[bad])


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICE_AGENT_TOKEN", "s3cret")
    assert load_config().server.token == "s3cret"


def test_shipped_configs_load() -> None:
    from importlib import resources

    for entry in resources.files("voice_agent.configs").iterdir():
        if entry.name.endswith(".toml") and entry.name != "models.toml":
            with resources.as_file(entry) as path:
                load_config(path)


def test_llm_api_key_comes_from_the_named_variable_and_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_LLM_KEY", "sk-very-secret")
    config = load_config(overrides=["llm.api_key_env=MY_LLM_KEY"])
    assert config.secrets.llm_api_key == "sk-very-secret"
    assert "sk-very-secret" not in repr(config)
