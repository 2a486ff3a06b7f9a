"""TOML configurations, installed as voice_agent.configs and read through importlib.resources."""
