"""The audio package imports neither voice_agent nor dlm, and no asyncio."""

from __future__ import annotations

import ast
from pathlib import Path

import audio

FORBIDDEN = {"voice_agent", "dlm", "asyncio"}


def test_audio_imports_stay_inside_its_boundary():
    for path in Path(audio.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
