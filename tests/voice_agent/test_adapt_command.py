"""`voice-agent adapt` exposes the recipe's steps with the same options as `python -m dlm.adapt`."""

from __future__ import annotations

from pathlib import Path

import pytest

from voice_agent import cli


def test_adapt_subcommand_parses_the_recipe_steps(tmp_path: Path) -> None:
    parser, modules = cli.build_parser()
    assert modules["adapt"] is not None
    args = parser.parse_args(["adapt", "pipeline", "--scale", "tiny", "--device", "cpu", "--out", str(tmp_path),
                              "--block-size", "16"])
    assert (args.step, args.scale, args.block_size, args.out) == ("pipeline", "tiny", 16, tmp_path)


def test_adapt_split_and_join_through_the_cli(tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 100)
    assert cli.main(["adapt", "split", str(src), "--out", str(tmp_path / "parts"), "--part-bytes", "10000"]) == 0
    manifest = tmp_path / "parts" / "blob.bin.manifest.json"
    assert cli.main(["adapt", "join", str(manifest), "--out", str(tmp_path / "back.bin")]) == 0
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_adapt_data_takes_requests_from_a_file_and_refuses_a_mismatch_before_loading_a_model(tmp_path: Path) -> None:
    requests = tmp_path / "requests.txt"
    requests.write_text("Why?\n", encoding="utf-8")  # no usable request
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--requests goes with --prompts file"):
        cli.main(["adapt", "data", "--requests", str(requests), "--prompts", "self", "--out", str(out)])
    with pytest.raises(SystemExit, match="--prompts file needs --requests"):
        cli.main(["adapt", "data", "--prompts", "file", "--out", str(out)])
    with pytest.raises(ValueError, match="no usable request"):
        cli.main(["adapt", "data", "--requests", str(requests), "--out", str(out)])
    requests.write_text("Set a timer for ten minutes.\nWhat time zone is Tokyo in?\n", encoding="utf-8")
    with pytest.raises(ValueError, match="2 usable requests, not more than the 64 held out"):
        cli.main(["adapt", "data", "--requests", str(requests), "--n-prompts", "100", "--n-heldout", "64",
                  "--out", str(out)])
    assert not (out / "data.jsonl").exists()
