"""The browser demo (static files), installed as voice_agent.web and served by `voice-agent serve`."""
