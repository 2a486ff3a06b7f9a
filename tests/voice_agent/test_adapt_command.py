"""`voice-agent adapt` exposes the recipe's steps with the same options as `python -m dlm.adapt`."""

from __future__ import annotations

from pathlib import Path

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
