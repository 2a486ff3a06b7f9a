"""The subcommands of `voice-agent`; see voice_agent/cli.py for the contract."""
