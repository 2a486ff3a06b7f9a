"""voice-agent: a low-latency voice agent on a block-diffusion LLM (the async layer)."""

__version__ = "0.1.0"
