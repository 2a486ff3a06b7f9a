import sys

from voice_agent.cli import run

sys.exit(run())
