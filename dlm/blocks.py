"""Float32 matrix products on a GGUF's own quantized blocks, on CPUs with AVX-512.

Why: at one row per decoding step a matrix product reads its whole weight. SmolLM2's float32
weights are 513 MiB a token; its GGUF blocks (Q4_1, Q8_0 head) are about a sixth of that, and
rebuilt in registers they give exactly the float32 model's weights. So the default model keeps
its float32 arithmetic, and its replies, at a fraction of the bytes.

Contract:
- `available()` -> None where the kernel runs here, else the reason it does not (no AVX-512, no C
  compiler, a failed build; or VOICE_AGENT_BLOCKS=0 in the environment).
- `BlockWeight.q4(q, scale, minimum)` (GGUF Q4_0 / Q4_1: w = q * scale + minimum, q 0..15) and
  `BlockWeight.q8(q, scale)` (Q8_0: w = q * scale): a weight (N, K) kept as its blocks of 32 (K a
  multiple of 64), in the layouts dlm/blocks.c describes. Calling it on x (..., K) float32 gives
  x @ W^T in float32, where each weight is, bit for bit, the float32 dequantisation's
  (dlm.gguf_file.convert_gguf); only the order of the sums differs from a dense product, and that
  order is fixed: a row's result does not depend on the other rows of the call, nor on the thread
  count. `with_low_rank(down, up)`: plus an unmerged update x down^T up^T in float32 (a fine-tune,
  dlm.adapter), inside the same call (`LowRank`); `cat(parts)`: projections of one input side by side (one call).
  `bf16()`: the same blocks with their products in bf16 on AMX (weights and inputs rounded to bf16,
  float32 sums in a fixed order per output, the update in bf16 after them): still a row's own bits;
  `amx_available()` says whether that runs here (AMX, AVX512-BF16, VOICE_AGENT_AMX not 0).
  `split()`: the same blocks with float32-accurate products on AMX (each input the exact sum of
  three bf16 parts, the blocks' integers exact in bf16, float32 sums; the update in float32): a
  float32 model's results up to the order of its sums, at about the price of bf16 for many rows
  (a row's own bits too; the same `amx_available()`).
  `int8()` / `int16()`: the same blocks in integer products on AVX512-VNNI, each row's inputs
  rounded to 8 bits (llama.cpp-style: logits close to float32's, other greedy replies on
  some prompts) or 16 bits (logit errors some 250 times smaller) per block of 32; `vnni_available()`
  says whether they run here (VOICE_AGENT_VNNI not 0); a row's own bits too.
  `BlockWeight.from_gguf_blocks(kind, blocks, products)`: the same weights in that layout straight
  from a GGUF's stored bytes (dlm.gguf_file.read_block_bytes), in one copy.
- `BlockLayers(layers, n_heads=, n_kv_heads=, head_dim=, eps=)` (`LayerWeights` per layer): a
  Llama-style decoder's every layer in one C call over a KV cache (dlm.model.Transformer.use_blocks
  builds it); each row from its own inputs and cache row only; `supported(...)` says which
  shapes it takes. With `DraftUpdates` (a drafter's low-rank updates, dlm.drafter) the rows
  marked as draft slots add them to every projection; the other rows are computed as without.
  With `final_norm` the rows leave through the model's final RMSNorm, in the same call. The KV
  cache is float32, or float16 (half the bytes a long context's attention reads; K and V rounded
  to the nearest float16 as they are written: `llm.kv_cache`, whose "auto" picks it where the
  products round their inputs anyway).
- `row_argmax(x)` / `row_top(x)`: `x.argmax(-1)` (the same indices, ties and NaN as torch picks)
  and with it softmax's largest probability, in the kernel where it is loaded already, else in
  torch: a decoding step's argmax over a vocabulary without torch's slow index reduction.
- The C source (dlm/blocks.c, shipped in the package) is compiled with the system C compiler ($CC,
  else cc) on first use into <cache dir>/kernels/ (dlm.gguf_file.default_cache_dir), named by a hash
  of the source and the compiler command, so a change of either builds again; concurrent builders
  each write their own file and rename it into place. It runs in torch's own OpenMP runtime
  (torch is imported first, and the library names the same libgomp.so.1), with torch's intra-op
  thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.gguf_file import BLOCK_BYTES, block_scales, default_cache_dir

__all__ = ["AMX_BF16", "AMX_SPLIT", "FUSED_PROJECTIONS", "UNIT", "VNNI_INT8", "VNNI_INT16", "BlockDraftPass", "BlockLayers",
           "BlockWeight", "DraftUpdates", "LayerWeights", "LowRank", "amx_available", "available", "product_peak",
           "row_argmax", "row_top", "vnni_available"]

SOURCE = Path(__file__).with_name("blocks.c")
UNIT = 64  # inputs per unit of the kernel (two blocks of 32): K must be a multiple
# `BlockWeight.products`: float32 (0), bf16 on AMX (`bf16()`), float32-accurate on AMX (`split()`),
# integer products on VNNI with 8-bit (llama.cpp-style, `int8()`) or 16-bit inputs (`int16()`)
AMX_BF16, AMX_SPLIT, VNNI_INT8, VNNI_INT16 = 1, 2, 3, 4
_TILED = (AMX_SPLIT, VNNI_INT8, VNNI_INT16)  # products whose weights are laid out by tiles of 16 outputs
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]
_LIBS = ["-lm"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or shutil.which("gcc")


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS, *_LIBS]).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"blocks-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".blocks-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, "-o", tmp, str(SOURCE), *_LIBS], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("VOICE_AGENT_BLOCKS", "1") == "0":
            _reason = "switched off (VOICE_AGENT_BLOCKS=0)"
            return None
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _reason = f"the float32 block kernel could not be built: {e}"
            return None
        if not lib.blocks_cpu_supported():
            _reason = "this CPU has no AVX-512 (F and BW), which the float32 block kernel needs"
            return None
        lib.blocks_matmul.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
                                      + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
                                      + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p])
        lib.blocks_matmul.restype = ctypes.c_int
        lib.blocks_amx_init.restype = ctypes.c_int
        lib.blocks_vnni_supported.restype = ctypes.c_int
        lib.blocks_forward.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                                       + [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 4
                                       + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
                                       + [ctypes.c_void_p] * 3 + [ctypes.c_int])
        lib.blocks_forward.restype = ctypes.c_int
        lib.blocks_draft_pass.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                                          + [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_float]
                                          + [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int])
        lib.blocks_draft_pass.restype = ctypes.c_int
        lib.blocks_argmax.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        lib.blocks_argmax.restype = None
        lib.blocks_peak.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
        lib.blocks_peak.restype = ctypes.c_int64
        _lib = lib
        return lib


def _kernel() -> ctypes.CDLL:
    """The loaded library (loaded once; no lock on the decoding path after that), or RuntimeError."""
    lib = _lib or _load()
    if lib is None:
        raise RuntimeError(f"float32 block weights cannot run: {_reason}")
    return lib


def available() -> str | None:
    """None where the kernel runs on this machine, else why not (one line)."""
    _load()
    return _reason


def row_argmax(x: Tensor) -> Tensor:
    """`x.argmax(dim=-1)`: the first index of each row's largest value (a NaN counts as largest).
    In the kernel where it is loaded already (a model on block weights loads it; this never
    builds it) and x is float32 on the CPU (`blocks_argmax`: some 9 us a row of SmolLM2's 49152
    logits, where torch's reduction takes some 45 us), else in torch; the same indices either way."""
    return _row_top(x, False)[0]


def row_top(x: Tensor) -> tuple[Tensor, Tensor]:
    """(`row_argmax(x)`, the softmax probability of that largest value: `softmax(x, -1).amax(-1)`
    to within float32 rounding), in one call of the kernel where `row_argmax` runs there."""
    best, top = _row_top(x, True)
    assert top is not None
    return best, top


def _row_top(x: Tensor, with_top: bool) -> tuple[Tensor, Tensor | None]:
    lib = _lib
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] == 0:
        best = x.argmax(dim=-1)
        return best, torch.softmax(x.float(), dim=-1).amax(dim=-1) if with_top else None
    rows = x.contiguous()
    best = torch.empty(x.shape[:-1], dtype=torch.long)
    top = torch.empty(x.shape[:-1]) if with_top else None
    if best.numel():
        lib.blocks_argmax(rows.data_ptr(), best.numel(), x.shape[-1], best.data_ptr(), None if top is None else top.data_ptr())
    return best, top


# `product_peak`: the products whose instruction it times, each with what it times
PEAK_MEASURED = {0: "float32 FMAs", VNNI_INT8: "8-bit VNNI products", VNNI_INT16: "16-bit VNNI products"}


def product_peak(products: int, threads: int, seconds: float = 0.05, tries: int = 3) -> float | None:
    """This CPU's peak rate, in multiply-adds a second over `threads` threads, of the instruction
    that block products `products` (0: float32, `VNNI_INT8`, `VNNI_INT16`; see `BlockWeight`) are
    made of, counted at their precision: FMAs (16 a float32 instruction), vpdpbusd (64 with 8-bit
    inputs, 32 with 16-bit ones, which take two). Registers only, each try about `seconds` long,
    the fastest of `tries` kept (dlm/blocks.c `blocks_peak`): the ceiling for products of those
    weights made of that instruction, whatever the kernel around it. None for the AMX tiles'
    products (not measured) or where this CPU cannot run them (no VNNI); RuntimeError where the
    kernel cannot run at all; ValueError for an unknown kind, a thread count or a duration below
    1 or 0."""
    if products not in (*PEAK_MEASURED, AMX_BF16, AMX_SPLIT):
        raise ValueError(f"no block products of kind {products!r} (0, AMX_BF16, AMX_SPLIT, VNNI_INT8 or VNNI_INT16)")
    if threads < 1 or not seconds > 0 or tries < 1:
        raise ValueError(f"product_peak needs threads >= 1, seconds > 0 and tries >= 1, not {threads}, {seconds}, {tries}")
    if products not in PEAK_MEASURED:
        return None
    lib = _kernel()

    def rate(rounds: int) -> tuple[float, float] | None:
        t0 = time.perf_counter()
        done = lib.blocks_peak(products, rounds, threads)
        elapsed = time.perf_counter() - t0
        return None if done < 0 else (done / elapsed, elapsed)

    rounds = 1 << 12
    while True:  # grow the rounds until a try lasts about `seconds` (a few steps: each try lasts longer)
        first = rate(rounds)
        if first is None:
            return None
        if first[1] >= seconds / 2:
            break
        rounds *= 2 if first[1] > seconds / 8 else 8
    return max(first[0], *(rate(rounds)[0] for _ in range(tries - 1)))


_amx_reason: str | None = None
_amx_tried = False


def amx_available() -> str | None:
    """None where the bf16 (AMX) products run here (`BlockWeight.bf16`), else why not (one line)."""
    global _amx_reason, _amx_tried
    with _lock:
        if _amx_tried:
            return _amx_reason
    reason = available()
    lib = _lib
    with _lock:
        if not _amx_tried:
            _amx_tried = True
            if reason is not None:
                _amx_reason = reason
            elif os.environ.get("VOICE_AGENT_AMX", "1") == "0":
                _amx_reason = "switched off (VOICE_AGENT_AMX=0)"
            else:
                code = lib.blocks_amx_init()
                _amx_reason = {0: None, -1: "this CPU has no AMX tiles with bf16",
                               -2: "this CPU has no AVX512-BF16"}.get(code, "the kernel does not let this process use AMX tiles")
        return _amx_reason


def vnni_available() -> str | None:
    """None where integer products run here (`BlockWeight.int8`, `int16`: AVX512-VNNI), else why not."""
    reason = available()
    if reason is None and os.environ.get("VOICE_AGENT_VNNI", "1") == "0":
        reason = "switched off (VOICE_AGENT_VNNI=0)"
    elif reason is None and not _lib.blocks_vnni_supported():
        reason = "this CPU has no AVX512-VNNI, which the integer products need"
    return reason


class _CBf16Update(ctypes.Structure):
    """dlm/blocks.c `bf16_update`."""

    _fields_ = [("down", ctypes.c_void_p), ("up_t", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("r_total", ctypes.c_int64), ("rp", ctypes.c_int64)]


@dataclass
class LowRank:
    """An update W + up @ down, unmerged, in the kernel's layout: output n adds
    t[offset[n] : offset[n] + rank] . up[n], where t = x @ down^T (fused projections keep their
    own slices of t); the rank is padded with zeros to a multiple of 16. down and up are kept in
    bf16 where every value of both is a bf16 number (a fine-tune saved in bf16, dlm.adapter), else
    in float32: the kernel reads the same float32 numbers either way, bf16 at half the bytes (an
    update is read at every forward)."""

    down: Tensor  # (R_total, K) float32 or bfloat16
    up: Tensor  # (N, rank), down's dtype
    offset: Tensor  # (N,) int32

    @classmethod
    def of(cls, down: Tensor, up: Tensor) -> LowRank:
        rank = -(-down.shape[0] // 16) * 16
        down, up = down.detach().float(), up.detach().float()
        if all(torch.equal(t.to(torch.bfloat16).float(), t) for t in (down, up)):
            down, up = down.to(torch.bfloat16), up.to(torch.bfloat16)
        return cls(F.pad(down, (0, 0, 0, rank - down.shape[0])).contiguous(), F.pad(up, (0, rank - up.shape[1])).contiguous(),
                   torch.zeros(up.shape[0], dtype=torch.int32))

    @staticmethod
    def cat(parts: list[LowRank | None], out_features: list[int]) -> LowRank | None:
        """The updates of projections of one input side by side (fused q/k/v, gate/up): the downs
        stacked, each output reading its own part's slice (a part without an update, None, adds
        zeros); `out_features`: each part's outputs. None where no part has one."""
        updates = [u for u in parts if u is not None]
        if not updates:
            return None
        rank = max(u.rank for u in updates)
        dtype = torch.bfloat16 if all(u.down.dtype == torch.bfloat16 for u in updates) else torch.float32
        downs, ups, offsets, base = [], [], [], 0
        for u, n in zip(parts, out_features, strict=True):
            if u is None:
                ups.append(torch.zeros(n, rank, dtype=dtype))
                offsets.append(torch.zeros(n, dtype=torch.int32))
                continue
            if u.rank < rank and u.down.shape[0] != u.rank:
                raise ValueError("fused block weights of several ranks: fuse the single projections")
            downs.append(F.pad(u.down.to(dtype), (0, 0, 0, rank - u.rank)))  # a single part's down: rank rows
            ups.append(F.pad(u.up.to(dtype), (0, rank - u.rank)))
            offsets.append(u.offset + base)
            base += downs[-1].shape[0]
        return LowRank(torch.cat(downs).contiguous(), torch.cat(ups).contiguous(), torch.cat(offsets))

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def kernel_args(self) -> tuple[int, int, int, int, int, int]:
        """(down, up, offset pointers, rows of down, rank, 1 where bf16): the kernel's view of the update."""
        return (self.down.data_ptr(), self.up.data_ptr(), self.offset.data_ptr(), self.down.shape[0], self.rank,
                int(self.down.dtype == torch.bfloat16))

    def _up_by_tiles(self, what: str) -> Tensor:
        """up by tiles of 16 outputs, transposed: (N / 16, rank, 16). ValueError where a tile of
        16 outputs would read two slices of t (parts of a fused projection that are not multiples
        of 16 wide)."""
        n, rank = self.up.shape
        tiles = self.offset.view(-1, 16) if n % 16 == 0 else None
        if tiles is None or not bool((tiles == tiles[:, :1]).all()):
            raise ValueError(f"a low-rank update {what} needs each tile of 16 outputs in one part of a fused projection")
        return self.up.view(n // 16, 16, rank).transpose(1, 2)

    @cached_property
    def bf16(self) -> _CBf16Update:
        """The update in bf16 as the kernel adds it after bf16 products and at draft slots
        (dlm/blocks.c `bf16_update`: down, and up by tiles of 16 outputs, transposed); built once.
        ValueError: see `_up_by_tiles`."""
        up_t = self._up_by_tiles("in bf16").to(torch.bfloat16).contiguous()
        down = self.down.to(torch.bfloat16).contiguous()
        self._bf16_tensors = (down, up_t)  # what the structure points into
        return _CBf16Update(down.data_ptr(), up_t.data_ptr(), self.offset.data_ptr(), self.down.shape[0], self.rank)

    @cached_property
    def _tiled_up(self) -> Tensor:
        return self._up_by_tiles("beside split or integer products").contiguous()

    def tile_args(self) -> tuple[int, int, int, int, int, int]:
        """`kernel_args` for split and integer products (dlm/blocks.c: up by tiles of 16 outputs,
        transposed); ValueError: see `_up_by_tiles`."""
        return (self.down.data_ptr(), self._tiled_up.data_ptr(), self.offset.data_ptr(), self.down.shape[0], self.rank,
                int(self.down.dtype == torch.bfloat16))

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes + self.offset.nbytes


@dataclass
class BlockWeight:
    """A weight (N, K) as its quantized blocks; see the module docstring."""

    kind: int  # 0: Q4 (Q4_0, Q4_1), 1: Q8 (Q8_0)
    data: Tensor  # Q4: (N, K / 64, 32) uint8; Q8: (N, K) int8
    scales: Tensor  # Q4: (N, K / 64, 4) float32 (d, m of each block of the unit); Q8: (N, K / 32) float32
    # (split and integer products keep both in their own layouts by tiles of 16 outputs, scales in float16: dlm/blocks.c)
    in_features: int
    low_rank: LowRank | None = None
    products: int = 0  # 0: float32; AMX_BF16: bf16 on AMX (`bf16()`); AMX_SPLIT: float32-accurate on AMX (`split()`);
    # VNNI_INT8 / VNNI_INT16: integer products with 8-bit / 16-bit inputs (`int8()`, `int16()`)

    @classmethod
    def q4(cls, q: Tensor, scale: Tensor, minimum: Tensor) -> BlockWeight:
        """q (N, K) integers 0..15, scale and minimum (N, K / 32): w = q * scale + minimum."""
        n, k = _check_shape(q, scale)
        lanes = q.to(torch.uint8).view(n, k // UNIT, 4, 16)  # nibble s of lane j: weight s * 16 + j of the unit
        # 16-bit lane j in two bytes (little-endian, as the kernel reads it): nibbles 0, 1, then 2, 3
        low, high = (lanes[:, :, s] | lanes[:, :, s + 1] << 4 for s in (0, 2))
        data = torch.stack([low, high], dim=-1).view(n, k // UNIT, 32)
        scales = torch.stack([scale.float(), minimum.float()], dim=-1).view(n, k // UNIT, 4).contiguous()
        return cls(0, data, scales, k)

    @classmethod
    def q8(cls, q: Tensor, scale: Tensor) -> BlockWeight:
        """q (N, K) integers -128..127, scale (N, K / 32): w = q * scale."""
        _, k = _check_shape(q, scale)
        return cls(1, q.to(torch.int8).contiguous(), scale.float().contiguous(), k)

    @classmethod
    def from_gguf_blocks(cls, kind: str, blocks: Tensor, products: int = VNNI_INT16) -> BlockWeight:
        """A GGUF's weight as stored (`dlm.gguf_file.read_block_bytes`: kind "q4_0", "q4_1" or "q8_0",
        blocks (N, K / 32, bytes a block) uint8) laid out for the integer products (`products`:
        VNNI_INT16 or VNNI_INT8, which share the layout) in one copy: the bytes
        `q4(*codes).int16()` / `q8(...).int16()` make (`_integer_products`), without unpacking the
        codes and packing them twice. A Q4 block's 16 bytes already hold the nibble pairs the
        products read (byte j: weights j and j + 16), so they are only moved; a Q8 block's bytes
        gain 128. RuntimeError where VNNI cannot run here; ValueError for a shape the products
        cannot take."""
        if products not in (VNNI_INT8, VNNI_INT16):
            raise ValueError(f"products must be VNNI_INT8 or VNNI_INT16, not {products}")
        if (reason := vnni_available()) is not None:
            raise RuntimeError(f"integer block products cannot run: {reason}")
        n, nb, size = blocks.shape
        if BLOCK_BYTES.get(kind) != size:
            raise ValueError(f"GGUF blocks of kind {kind!r} and {size} bytes are not Q4_0, Q4_1 or Q8_0 ones")
        if nb * 32 % UNIT or n % 16:
            raise ValueError(f"integer block products need K a multiple of {UNIT} and outputs in multiples of 16, "
                             f"not ({n}, {nb * 32})")
        d, m = block_scales(kind, blocks)
        if kind == "q8_0":  # the stored int8 + 128, unsigned (see `_integer_products`)
            data = _by_tiles(blocks[..., 2:] ^ 128, 8)
        else:  # vector i < 4: lane j = nibble pairs 4i..4i+3 (weights 4i + b and 4i + b + 16) of output j
            data = _by_tiles(blocks[..., 4:] if kind == "q4_1" else blocks[..., 2:], 4)
        weight = cls(1 if kind == "q8_0" else 0, data, d, nb * 32, products=products)
        return replace(weight, scales=weight._tile_scales(d, m))

    @classmethod
    def quantize_q8(cls, weight: Tensor) -> BlockWeight:
        """A float weight (N, K) rounded to Q8_0 blocks as a GGUF writer rounds it: for each 32
        inputs of an output a float16 scale d = max |w| / 127, q = round(w / d)."""
        w = weight.detach().float()
        n, k = w.shape
        if k % UNIT:
            raise ValueError(f"block weights need K a multiple of {UNIT}, not {k}")
        blocks = w.view(n, k // 32, 32)
        d = (blocks.abs().amax(-1) / 127).half().float()
        q = torch.where(d[..., None] > 0, torch.round(blocks / d[..., None].clamp_min(1e-30)), 0).clamp(-128, 127)
        return cls.q8(q.view(n, k), d)

    @property
    def out_features(self) -> int:
        return self.data.shape[0] * (16 if self.products in _TILED else 1)

    def bf16(self) -> BlockWeight:
        """The same blocks, their products in bf16 on AMX (dlm/blocks.c): each weight the float32
        dequantisation rounded to bf16, each input rounded to bf16, sums in float32, a low-rank
        update (`LowRank.bf16`) added after them in bf16; a row's result still depends on nothing
        but its own inputs. RuntimeError where AMX cannot run here."""
        self._check_products("bf16", AMX_BF16, amx_available())
        return replace(self, products=AMX_BF16)

    def split(self) -> BlockWeight:
        """The same blocks, their products float32-accurate on AMX (dlm/blocks.c "Float32-accurate
        products on AMX"): each input split into three bf16 parts whose sum it is exactly, the
        blocks' integers (exact in bf16) multiplied by them in the tiles, float32 sums, then each
        block's scale and minimum applied in float32; a low-rank update added in float32. Results
        of the float32 path's accuracy (not its bits: another order of sums), a row's own bits,
        in a layout of its own (scales in float16). RuntimeError where AMX cannot run here;
        ValueError where a scale is not a float16 value (a GGUF's always are)."""
        self._check_products("split", AMX_SPLIT, amx_available())
        if self.products == AMX_SPLIT:
            return self
        n, k = self.out_features, self.in_features
        q, d, m = self._integers()
        # line i of a block's B tile: lane 2t + e = input 2i + e of the tile's output t
        lines = q.view(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(n // 16, k // 32, 16, 32)
        data = (lines[:, :, 0::2] | lines[:, :, 1::2] << 4).to(torch.uint8) if self.kind == 0 else lines.to(torch.int8)
        return replace(self, data=data.contiguous(), scales=self._tile_scales(d, m), products=AMX_SPLIT)

    def int8(self) -> BlockWeight:
        """The same blocks with llama.cpp-style 8-bit inputs on AVX512-VNNI (dlm/blocks.c "Integer products
        on VNNI"): each row's inputs rounded to 8 bits per block of 32 (unit max |x| / 127), the
        integer products summed exactly, then each block's scales applied in float32; a low-rank
        update added in float32. Logits close to float32's but not its greedy replies on every
        prompt; a row's own bits still (whatever the other rows). About a third of the float32
        path's arithmetic per row. RuntimeError where VNNI cannot run here; ValueError where a
        scale is not a float16 value (a GGUF's always are)."""
        return self._integer_products("int8", VNNI_INT8)

    def int16(self) -> BlockWeight:
        """`int8`'s layout and products, each row's inputs rounded to 16 bits per block of 32
        (unit max |x| / 32512, in two bytes: two integer products per weight): errors some 250
        times smaller than 8 bits' (smaller than bf16 inputs'), at about half the float32 path's
        arithmetic per row."""
        return self._integer_products("int16", VNNI_INT16)

    def _integer_products(self, what: str, products: int) -> BlockWeight:
        self._check_products(what, products, vnni_available())
        if self.products in (VNNI_INT8, VNNI_INT16):  # the same layout
            return replace(self, products=products)
        n, k = self.out_features, self.in_features
        q, d, m = self._integers()
        if self.kind == 1:
            q = q.view(torch.uint8) ^ 128  # q + 128, unsigned for VNNI; the kernel takes 128 times the inputs' sum off
        vectors = _by_tiles(q.view(n, k // 32, 32), 8)
        data = vectors[:, :, :4] | vectors[:, :, 4:] << 4 if self.kind == 0 else vectors
        return replace(self, data=data.contiguous(), scales=self._tile_scales(d, m), products=products)

    def _integers(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q (N, K), d, m (N, K / 32)) of float32-product blocks: w = q d + m; Q4: q uint8 0..15,
        Q8: q int8 as stored, m = 0. A byte a weight: a re-layout's temporaries stay small."""
        n, k = self.out_features, self.in_features
        if self.kind == 0:
            pairs = self.data.view(n, k // UNIT, 16, 2)  # lane j's two bytes: nibbles 0, 1 and 2, 3 (see `q4`)
            q = torch.stack([pairs[..., 0] & 15, pairs[..., 0] >> 4, pairs[..., 1] & 15, pairs[..., 1] >> 4], dim=2)
            d, m = self.scales.view(n, k // 32, 2).unbind(-1)
            return q.view(n, k), d, m
        return self.data, self.scales, torch.zeros_like(self.scales)

    def _tile_scales(self, d: Tensor, m: Tensor) -> Tensor:
        """d and m by tiles of 16 outputs, in float16: (N / 16, K / 32, 2, 16)."""
        n, k = self.out_features, self.in_features
        return torch.stack([_half(t).reshape(n // 16, 16, k // 32).transpose(1, 2) for t in (d, m)], dim=2).contiguous()

    def _check_products(self, what: str, products: int, reason: str | None) -> None:
        if reason is not None:
            raise RuntimeError(f"{what} block products cannot run: {reason}")
        if self.products not in (0, products) and {self.products, products} != {VNNI_INT8, VNNI_INT16}:
            raise ValueError(f"these block weights already run their products another way, not {what}")
        if self.out_features % 16:
            raise ValueError(f"{what} block products need outputs in multiples of 16, not {self.out_features}")

    def with_low_rank(self, down: Tensor, up: Tensor) -> BlockWeight:
        """These weights plus W += up @ down (a LoRA update with its scale folded into `up`), kept
        apart: a float32 product of the rows with it is added to the block product (in bf16 where
        the products are, `bf16()`)."""
        if self.low_rank is not None:
            raise ValueError("these block weights already carry a low-rank update")
        n, k = self.out_features, self.in_features
        if down.shape[1] != k or up.shape[0] != n or down.shape[0] != up.shape[1]:
            raise ValueError(f"a low-rank update of a ({n}, {k}) weight needs down (R, {k}) and up ({n}, R), "
                             f"not {tuple(down.shape)} and {tuple(up.shape)}")
        return replace(self, low_rank=LowRank.of(down, up))

    @staticmethod
    def cat(parts: list[BlockWeight | None]) -> BlockWeight | None:
        """Weights of one input side by side (fused q/k/v, gate/up); None where a part is missing
        or the parts' kinds differ. Low-rank updates, where any part has one, side by side too:
        the downs stacked, each output reading its own part's slice (a part without an update adds
        zeros)."""
        if not all(parts) or len({(p.kind, p.in_features, p.products) for p in parts}) != 1:
            return None
        low_rank = LowRank.cat([p.low_rank for p in parts], [p.out_features for p in parts])
        return BlockWeight(parts[0].kind, torch.cat([p.data for p in parts]), torch.cat([p.scales for p in parts]),
                           parts[0].in_features, low_rank, parts[0].products)

    def __call__(self, x: Tensor) -> Tensor:
        lib = _kernel()
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"float32 block weights take float32 CPU inputs, not {x.dtype} on {x.device}")
        rows = x.reshape(-1, self.in_features).contiguous()
        m = rows.shape[0]
        out = torch.empty(m, self.out_features)
        u = self.low_rank
        t = None if u is None else torch.empty(m, u.down.shape[0])  # the kernel's scratch: x @ down^T
        bf16_update = ctypes.addressof(u.bf16) if u is not None and self.products == AMX_BF16 else None
        if m and lib.blocks_matmul(rows.data_ptr(), self.data.data_ptr(), self.scales.data_ptr(), out.data_ptr(), m,
                                   self.out_features, self.in_features, self.kind, torch.get_num_threads(),
                                   *_f32_update(self), None if t is None else t.data_ptr(), self.products, bf16_update) != 0:
            raise MemoryError("the block product could not allocate its buffers")
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + (0 if self.low_rank is None else self.low_rank.nbytes)


class _CWeight(ctypes.Structure):
    """dlm/blocks.c `block_weight`."""

    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("kind", ctypes.c_int64), ("down", ctypes.c_void_p), ("up", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("r_total", ctypes.c_int64), ("rp", ctypes.c_int64), ("lr_bf16", ctypes.c_int64), ("bias", ctypes.c_void_p),
                ("products", ctypes.c_int64),
                ("upd", _CBf16Update)]


class _CLayer(ctypes.Structure):
    """dlm/blocks.c `block_layer`."""

    _fields_ = [("ln_in", ctypes.c_void_p), ("ln_post", ctypes.c_void_p), ("qkv", _CWeight), ("o", _CWeight),
                ("gate_up", _CWeight), ("down", _CWeight)]


def _f32_update(weight: BlockWeight) -> tuple[int | None, ...]:
    """The kernel's float32 update arguments (none where there is no update or it runs in bf16)."""
    u = weight.low_rank
    if u is None or weight.products == AMX_BF16:
        return None, None, None, 0, 0, 0
    return u.tile_args() if weight.products in _TILED else u.kernel_args()


def _c_weight(weight: BlockWeight, bias: Tensor | None) -> _CWeight:
    u = weight.low_rank
    return _CWeight(weight.data.data_ptr(), weight.scales.data_ptr(), weight.out_features, weight.in_features, weight.kind,
                    *_f32_update(weight), None if bias is None else bias.data_ptr(), weight.products,
                    u.bf16 if u is not None and weight.products == AMX_BF16 else _CBf16Update())


# BlockLayers' projections of a layer, in its order, and the projections (dlm.model.PROJECTIONS'
# short names) each one fuses
FUSED_PROJECTIONS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


class _CDraftLayer(ctypes.Structure):
    """dlm/blocks.c `draft_layer`."""

    _fields_ = [(name, _CBf16Update) for name in FUSED_PROJECTIONS]


class DraftUpdates:
    """A drafter's low-rank updates of every layer in the kernel's layout (dlm.drafter.Drafter
    .block_updates builds them): per layer, a LowRank or None for each of FUSED_PROJECTIONS (fused
    q/k/v and gate/up as `LowRank.cat` lays them out). `BlockLayers` adds them at the rows that are
    draft slots only, kept in bf16 (a draft decides nothing exact, and its weights are read every
    forward). ValueError where a tile of 16 outputs reads two slices of t (parts of a fused
    projection that are not multiples of 16 wide)."""

    def __init__(self, layers: list[dict[str, LowRank | None]]) -> None:
        self._keep = layers  # the updates whose bf16 tensors the structures point into
        self._layers = (_CDraftLayer * len(layers))(*[
            _CDraftLayer(*[_CBf16Update() if layer.get(n) is None else layer[n].bf16 for n in FUSED_PROJECTIONS])
            for layer in layers])
        self.address = ctypes.addressof(self._layers)
        self.n_layers = len(layers)


@dataclass
class LayerWeights:
    """One Llama-style decoder layer on block weights: RMSNorm weights (D,) float32, and the fused
    q/k/v (with its bias or None), o, fused gate/up and down projections."""

    ln_in: Tensor
    ln_post: Tensor
    qkv: BlockWeight
    qkv_bias: Tensor | None
    o: BlockWeight
    gate_up: BlockWeight
    down: BlockWeight


class BlockLayers:
    """Every decoder layer of a model at once: one C call (`blocks_forward`) runs a forward's rows
    through all of them, instead of some twenty torch operations per layer (at one row per
    decoding step those calls, not the arithmetic, were a third of the time). Each row is computed
    from its own inputs and cache row only (dlm/blocks.c). `supported(...)` says whether the
    dimensions fit the kernel (None) or why not."""

    def __init__(self, layers: list[LayerWeights], *, n_heads: int, n_kv_heads: int, head_dim: int, eps: float) -> None:
        dim, intermediate = layers[0].qkv.in_features, layers[0].down.in_features
        reason = self.supported(dim, n_heads, n_kv_heads, head_dim, intermediate)
        if reason is not None:
            raise ValueError(reason)
        qkv_width = (n_heads + 2 * n_kv_heads) * head_dim
        for i, w in enumerate(layers):  # the C reads and writes by these shapes: every weight must have them
            shapes = {"qkv": (w.qkv, qkv_width, dim), "o": (w.o, dim, n_heads * head_dim),
                      "gate_up": (w.gate_up, 2 * intermediate, dim), "down": (w.down, dim, intermediate)}
            for name, (weight, out_features, in_features) in shapes.items():
                if (weight.out_features, weight.in_features) != (out_features, in_features):
                    raise ValueError(f"layer {i} {name}: {weight.out_features} x {weight.in_features} weights where "
                                     f"these dimensions need {out_features} x {in_features}")
            norms = {"ln_in": (w.ln_in, dim), "ln_post": (w.ln_post, dim),
                     **({} if w.qkv_bias is None else {"qkv_bias": (w.qkv_bias, qkv_width)})}
            for name, (t, want) in norms.items():
                if t.numel() != want:
                    raise ValueError(f"layer {i} {name}: {t.numel()} values where these dimensions need {want}")
        self._keep = [(w.ln_in.detach().float().contiguous(), w.ln_post.detach().float().contiguous(),
                       None if w.qkv_bias is None else w.qkv_bias.detach().float().contiguous()) for w in layers]
        self._layers = (_CLayer * len(layers))(*[
            _CLayer(ln_in.data_ptr(), ln_post.data_ptr(), _c_weight(w.qkv, bias), _c_weight(w.o, None),
                    _c_weight(w.gate_up, None), _c_weight(w.down, None))
            for w, (ln_in, ln_post, bias) in zip(layers, self._keep, strict=True)])
        self._weights = layers  # the blocks the structures point into stay alive with them
        self._address = ctypes.addressof(self._layers)
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.intermediate = intermediate
        self.eps = float(eps)

    def without_low_rank(self) -> BlockLayers:
        """These layers on the same block weights (no copy) without the low-rank updates they carry
        (an adapter's, dlm.adapter.unmerged_update): the base model's layers."""
        def plain(w: BlockWeight) -> BlockWeight:
            return w if w.low_rank is None else replace(w, low_rank=None)

        return BlockLayers([replace(w, qkv=plain(w.qkv), o=plain(w.o), gate_up=plain(w.gate_up), down=plain(w.down))
                            for w in self._weights],
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, eps=self.eps)

    @staticmethod
    def supported(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, intermediate: int) -> str | None:
        if min(dim, head_dim, intermediate, n_heads, n_kv_heads) < 1:
            return f"the fused block forward needs dimensions of at least 1, not {dim}, {head_dim}, {intermediate}"
        if dim % 16 or head_dim % 16 or intermediate % 16 or head_dim > 256:
            return (f"the fused block forward needs the width, head size and MLP size multiples of 16 (head size at "
                    f"most 256), not {dim}, {head_dim}, {intermediate}")
        if n_heads % n_kv_heads:
            return f"{n_heads} query heads do not share {n_kv_heads} key/value heads evenly"
        return None

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor,
                 writes: Tensor, mask: Tensor, drafts: DraftUpdates | None = None, drafted: Tensor | None = None,
                 final_norm: Tensor | None = None) -> None:
        """x (M, dim) float32 contiguous, run through every layer in place. Row m: RoPE tables cos,
        sin (M, head_dim); its K/V written at cache row rows[m], position writes[m] (int64, (M,));
        it attends to that row's positions 0..K-1 where mask (M, K) (bool or uint8) is true.
        k_cache, v_cache (L, cache rows, S + 1, Hkv, head_dim) contiguous (dlm.model.KVCache), both
        float32, or both float16 (K and V rounded to the nearest float16 as they are written).
        drafts, drafted (M,) bool: a drafter's updates, added at the rows where drafted is true
        (draft slots; the other rows come out as without them). final_norm (dim,) float32
        contiguous: every row leaves through that RMSNorm (a model's final norm, in the kernel
        instead of the half dozen torch calls after it). IndexError where a row, a position or K
        falls outside the cache."""
        lib = _kernel()
        m, k = mask.shape
        if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the KV cache must be float32 or float16, K and V alike, not {k_cache.dtype} and {v_cache.dtype}")
        if (drafts is None) != (drafted is None) or (drafts is not None and drafts.n_layers != len(self._layers)):
            raise ValueError("pass a drafter's updates of every layer and the rows they apply to together")
        if final_norm is not None and (final_norm.dtype != torch.float32 or final_norm.shape != (self.dim,)
                                       or not final_norm.is_contiguous()):
            raise ValueError(f"final_norm must be float32 contiguous ({self.dim},), not {final_norm.dtype} "
                             f"{tuple(final_norm.shape)}")
        if not m:
            return
        status = lib.blocks_forward(
                x.data_ptr(), m, self.dim, len(self._layers), self._address, self.n_heads, self.n_kv_heads, self.head_dim,
                self.intermediate, self.eps, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                k_cache.shape[1], k_cache.shape[2], rows.data_ptr(), writes.data_ptr(), mask.data_ptr(), k,
                torch.get_num_threads(), None if drafts is None else drafts.address,
                None if drafted is None else drafted.data_ptr(), None if final_norm is None else final_norm.data_ptr(),
                int(k_cache.dtype == torch.float16))
        if status == -2:  # checked in the kernel before it wrote anything
            raise IndexError(f"cache rows or positions out of the cache's {tuple(k_cache.shape[1:3])} (keys: {k})")
        if status != 0:
            raise MemoryError("the fused block forward could not allocate its buffers")


class BlockDraftPass:
    """A draft head's pass (dlm/draft_head.py) in one C call (`blocks_draft_pass`): its context
    rows through `fuse`, each pass's context rows then its first n `slots` through `layers`
    (`BlockLayers`, over a scratch cache of the pass's positions) and a final norm, the slot rows
    through `head`: the same products in the same order as those steps one by one (the same
    bits), without the dozens of torch and ctypes calls between them that cost a fifth of a
    decoding step's pass on a 2-core CPU (docs/benchmarks.md, "Session 37"). With `embed` (a
    causal head's, DraftHeadConfig.causal: the base's input embedding of each of the head's first
    `n_vocab` outputs, (n_vocab, dim) bf16), the slots go one place at a time, each reading the
    embedding of the one before it's draft (its largest score)."""

    def __init__(self, fuse: BlockWeight, layers: BlockLayers, slots: Tensor, final_norm: Tensor, head: BlockWeight,
                 embed: Tensor | None = None) -> None:
        if fuse.low_rank is not None or head.low_rank is not None:
            raise ValueError("a draft pass's input and output projections carry no low-rank update")
        if (fuse.out_features != layers.dim or head.in_features != layers.dim or slots.dim() != 2
                or slots.shape[-1] != layers.dim or final_norm.numel() != layers.dim):
            raise ValueError(f"a draft pass needs fuse -> {layers.dim}, slots (n, {layers.dim}), a final norm of "
                             f"{layers.dim} and head {layers.dim} -> V, not {fuse.out_features}, {tuple(slots.shape)}, "
                             f"{final_norm.numel()} and {head.in_features}")
        self.fuse, self.layers, self.head = fuse, layers, head
        self.slots = slots.detach().float().contiguous()
        self.final_norm = final_norm.detach().float().contiguous()
        self._fuse, self._head = _c_weight(fuse, None), _c_weight(head, None)
        if embed is not None and (embed.dtype != torch.bfloat16 or embed.dim() != 2 or embed.shape[1] != layers.dim
                                  or not 1 <= len(embed) <= head.out_features):
            raise ValueError(f"a causal draft pass needs its outputs' embeddings (n <= {head.out_features}, "
                             f"{layers.dim}) bf16, not {tuple(embed.shape)} {embed.dtype}")
        self.embed = None if embed is None else embed.contiguous()

    def __call__(self, inputs: Tensor, n: int, cos: Tensor, sin: Tensor, mask: Tensor, bar: float = 0.0) -> Tensor:
        """inputs (B, W, fuse.in_features) float32 contiguous: the context rows' inputs; n slots
        (at most slots' rows); cos, sin (B * T, head_dim), T = W + n: each row's RoPE tables;
        mask (B * T, T) uint8 contiguous: which of its pass's positions each row attends to. ->
        (B, n, head.out_features) float32. bar (causal only): after the first place where every
        pass's chain confidence is below it, the later places are not drafted (their scores 0)."""
        B, W, width = inputs.shape
        T = W + n
        if width != self.fuse.in_features or inputs.dtype != torch.float32 or not inputs.is_contiguous():
            raise ValueError(f"a draft pass takes float32 contiguous inputs (B, W, {self.fuse.in_features}), not "
                             f"{inputs.dtype} {tuple(inputs.shape)}")
        if (not 1 <= n <= self.slots.shape[0] or mask.shape != (B * T, T) or mask.dtype != torch.uint8
                or not mask.is_contiguous()):
            raise ValueError(f"a pass of {B} x {W} context rows and {n} slots (of {self.slots.shape[0]}) needs a "
                             f"({B * T}, {T}) uint8 contiguous mask, not {tuple(mask.shape)} {mask.dtype}")
        if any(t.shape != (B * T, self.layers.head_dim) or t.dtype != torch.float32 or not t.is_contiguous()
               for t in (cos, sin)):
            raise ValueError(f"a draft pass needs float32 contiguous RoPE tables ({B * T}, {self.layers.head_dim}), "
                             f"not {tuple(cos.shape)} and {tuple(sin.shape)}")
        out = (torch.empty if self.embed is None else torch.zeros)(B, n, self.head.out_features)
        lay = self.layers
        if B and _kernel().blocks_draft_pass(
                inputs.data_ptr(), B, W, n, lay.dim, ctypes.addressof(self._fuse), self.slots.data_ptr(), len(lay._layers),
                lay._address, lay.n_heads, lay.n_kv_heads, lay.head_dim, lay.intermediate, lay.eps, cos.data_ptr(),
                sin.data_ptr(), mask.data_ptr(), self.final_norm.data_ptr(), ctypes.addressof(self._head), out.data_ptr(),
                None if self.embed is None else self.embed.data_ptr(), 0 if self.embed is None else len(self.embed),
                bar, torch.get_num_threads()) != 0:
            raise MemoryError("the draft pass could not allocate its buffers")
        return out


def _by_tiles(blocks: Tensor, vectors: int) -> Tensor:
    """Bytes (N, K / 32, 4 * vectors) of each output's blocks as the integer products read them:
    (N / 16, K / 32, vectors, 64), vector i of a block holding in lane j (bytes 4j..4j+3) bytes
    4i..4i+3 of the tile's output j. A copy."""
    n, nb, _ = blocks.shape
    return blocks.reshape(n // 16, 16, nb, vectors, 4).permute(0, 2, 3, 1, 4).reshape(n // 16, nb, vectors, 64).contiguous()


def _half(t: Tensor) -> Tensor:
    """A GGUF's block scales as the float16 they are stored in (split products read them so: a
    fifth of the bytes a step reads, and one conversion per 16); ValueError where a value is not one."""
    half = t.to(torch.float16)
    if not torch.equal(half.float(), t.float()):
        raise ValueError("block scales and minimums must be float16 values, as a GGUF stores them")
    return half


def _check_shape(q: Tensor, scale: Tensor) -> tuple[int, int]:
    n, k = q.shape
    if k % UNIT or scale.shape != (n, k // 32):
        raise ValueError(f"block weights need K a multiple of {UNIT} and one scale per 32 weights: "
                         f"q {tuple(q.shape)}, scale {tuple(scale.shape)}")
    return n, k
