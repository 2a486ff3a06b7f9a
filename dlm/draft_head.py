"""The draft head: a small block-diffusion drafter that reads the verifier's own hidden states.

Contract:
- `DraftHead(model_config, DraftHeadConfig(...))` is a transformer of `n_layers` layers of the
  base's shape (2 in the shipped head) beside the base, whose weights it never changes; its
  `vocab` buffer holds the token ids it can draft. Its input is a context of up to
  `window` pairs (the base's final normed hidden state at a position, the token that position's
  prediction became final as: EAGLE's pairing of a feature with the token it produced) followed by
  `n_slots` mask slots; the slots attend to the whole context and to each other (bidirectional,
  as in a block-diffusion model's block) and are denoised in one pass. Slot i's output, through
  its own final norm and the base's output embedding restricted to `vocab` (the tokens the
  teacher's replies use), drafts the token i + 1 places after the context's last
  token. The context's last pair carries the token the verifier has just decided (the
  "bonus"), so unlike mask slots inside the base's forward (dlm/drafter.py) every draft knows the
  token before it. A causal head (`causal`) drafts one place at a time instead, as EAGLE's drafter
  does: slot i > 0 also reads the input embedding of place i - 1's draft (trained on the teacher's
  token there), and every position attends to those before it only; a pass then costs n small
  steps, each knowing the drafts before it.
- `forward(feats, tokens, valid, n, prev=None, bar=0.0)`: feats (B, W, dim) (n_features * dim with
  `feature_layers`), tokens (B, W), valid (B,) how many of the W pairs (the last ones) are real
  (fewer where a prefill forward held fewer positions, as a short new turn after prefix reuse) ->
  logits (B, n, len(vocab)) in float32. A causal head's place i drafts after the largest-scoring
  draft of each place before it, or, with prev (B, n - 1) token ids, after prev's (training:
  the teacher's tokens); with bar, drafting on its own it stops where no row's chain is that sure.
  The engine asks a parallel head for all `n_slots` (its slots see each other: a shorter block is
  another input), a causal head for its rows' longest draft, with its confidence bar.
- It runs after the verifying forward, on that forward's hidden states (dlm.speculative's
  `HeadSpeculativeDecoder`): a forward feeds only the last final token and the drafts, so a row's
  forward costs 1 + k positions of the base, and drafting costs one small pass.
- File: one safetensors file like a drafter's (dlm/drafter.py: the base's fingerprint, the adapter
  merged into it while training, `DrafterError` on any mismatch or damage), format
  `DRAFT_HEAD_FORMAT`; `dlm.drafter.load_drafter` reads either kind. The output embedding is not
  stored: `attach(model)` takes the vocab's rows from the base it is loaded onto.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.blocks import (
    UNIT,
    BlockDraftPass,
    BlockLayers,
    BlockWeight,
    LayerWeights,
    amx_available,
    available,
    vnni_available,
)
from dlm.config import ModelConfig
from dlm.model import (
    BlockProjection,
    DecoderLayer,
    Linear,
    Projection,
    RMSNorm,
    Transformer,
    can_pack_linears,
)

__all__ = ["DRAFT_HEAD_FORMAT", "DraftHead", "DraftHeadConfig"]

DRAFT_HEAD_FORMAT = "voice-agent-draft-head/1"
# The most a head's config may say (a damaged file's window of 10**6 would allocate terabytes).
MAX_WINDOW, MAX_SLOTS, MAX_LAYERS = 64, 16, 16


@dataclass
class DraftHeadConfig:
    window: int = 4  # context pairs (hidden state, token)
    n_slots: int = 6  # the longest draft block it was trained for
    n_layers: int = 2
    vocab_size: int = 0  # tokens it can draft (the ids are a buffer of the file)
    # Base layers whose outputs (RMS-normalised, no weight) join the final normed hidden state in
    # each context pair, as EAGLE-3's low/mid/high features; () (the shipped head): the final state
    # only. Training and evaluation compute them; the engine feeds the final state only, and
    # refuses a head that reads more (HeadSpeculativeDecoder).
    feature_layers: tuple[int, ...] = ()
    # One place at a time, each slot reading the previous place's draft (see the module docstring);
    # False: every slot in one pass, seeing the others' mask slots only.
    causal: bool = False

    def __post_init__(self) -> None:
        # A file's values (JSON) as well as code's: integers in range, a real boolean (bool("no") is True).
        for name, most in (("window", MAX_WINDOW), ("n_slots", MAX_SLOTS), ("n_layers", MAX_LAYERS),
                           ("vocab_size", 1 << 20)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise ValueError(f"{name} must be an integer in [1, {most}], not {value!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be true or false, not {self.causal!r}")
        self.feature_layers = tuple(self.feature_layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.feature_layers):
            raise ValueError("feature_layers are base layer indices >= 0")

    @property
    def n_features(self) -> int:
        """Hidden-state vectors per context pair (each of the base's width)."""
        return 1 + len(self.feature_layers)


class DraftHead(nn.Module):
    def __init__(self, model_config: ModelConfig, config: DraftHeadConfig) -> None:
        super().__init__()
        self.config, self.model_config = config, model_config
        D = model_config.dim
        self.fuse = Linear((config.n_features + 1) * D, D, bias=False)
        self.slots = nn.Parameter(torch.zeros(config.n_slots, D))
        self.layers = nn.ModuleList(DecoderLayer(model_config) for _ in range(config.n_layers))
        self.norm = RMSNorm(D, model_config.norm_eps)
        self.register_buffer("vocab", torch.zeros(config.vocab_size, dtype=torch.long))
        self._embed: Callable[[Tensor], Tensor] | None = None  # the base's input embedding lookup (attach)
        self._head: Tensor | None = None  # its output embedding at `vocab` (attach)
        self._rope: tuple[Tensor, Tensor] | None = None
        self._packed_head: Projection | BlockProjection | None = None  # `pack()`, `use_blocks()`
        self._block_layers: BlockLayers | None = None  # `use_blocks()`
        self._draft_pass: BlockDraftPass | None = None  # `use_blocks()`: fuse, layers and output in one call
        self._plans: dict[tuple, tuple[Tensor, ...]] = {}  # per shape: tensors a pass reads, never writes

    @property
    def n_slots(self) -> int:
        return self.config.n_slots

    def attach(self, model: Transformer) -> None:
        """Read the base's embeddings and RoPE tables (never trained, never stored here)."""
        # A lookup, not the table (a loaded model may keep only its blocks); the base is never trained.
        self._embed = lambda tokens: model.embed(tokens).detach()
        with torch.no_grad():
            head = model.embed(self.vocab) if model.lm_head is None else model.lm_head.weight.detach()[self.vocab]
        self._head = head.float()
        T = self.config.window + self.config.n_slots
        self._rope = (model.rope_cos[:T, None].float(), model.rope_sin[:T, None].float())
        self._plans.clear()

    def pack(self) -> bool:
        """For inference on a CPU with oneDNN bf16 (AMX): every product in bf16 on packed weights
        (`dlm.model.Projection`), which take the calling thread's OpenMP threads; float32 products
        would run on one core inside an engine's worker (dlm.threads) and cost about 5 ms a pass
        for two layers. False (nothing done) where packing does not apply. Call after `attach`."""
        if self._head is None or not can_pack_linears(torch.bfloat16, self._head.device):
            return False
        self.to(torch.bfloat16)
        for layer in self.layers:
            layer.self_attn.pack({})
            layer.mlp.pack({})
        self.fuse.pack()
        self._packed_head = Projection(self._head.to(torch.bfloat16), None)
        return True

    def use_blocks(self) -> bool:
        """For inference on a CPU where the block kernel runs (dlm.blocks): the head's weights
        rounded to Q8 blocks (as a GGUF's Q8_0: a float16 scale per 32 weights), half the bytes of
        bf16 (they are read at every step), products float32-accurate on AMX where it runs
        (`BlockWeight.split`), else with 8-bit inputs on VNNI (`BlockWeight.int8`, llama.cpp's
        rounding: a pass of the shipped head 1.0 ms against 1.6 with the 16-bit inputs the base
        takes there, the same tokens per forward within 0.01 on three prompt sets; session 32),
        else in float32, and the whole pass (fusion, layers over a scratch cache of the pass's
        positions, final norm, output rows) in one C call (`BlockDraftPass`) instead of some forty
        torch operations. A draft moves only as much as that rounding moves it; the verifier
        decides every token.
        False (nothing done) where the kernel or the fused forward does not run here. Call after
        `attach`, on a float32 head."""
        c = self.model_config
        if (self._head is None or self._head.device.type != "cpu" or self.fuse.weight.dtype != torch.float32
                or c.qk_norm or available() is not None
                or any(k % UNIT for k in (c.dim, c.n_heads * c.head_dim, c.intermediate_size))
                or BlockLayers.supported(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size) is not None):
            return False
        amx, vnni = amx_available() is None, vnni_available() is None

        def q8(*weights: Tensor) -> BlockWeight:
            weight = BlockWeight.quantize_q8(torch.cat([w.detach() for w in weights]))
            return weight.split() if amx else weight.int8() if vnni else weight

        layers = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = None if attn.q_proj.bias is None else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            layers.append(LayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                       q8(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), bias,
                                       q8(attn.o_proj.weight), q8(mlp.gate_proj.weight, mlp.up_proj.weight),
                                       q8(mlp.down_proj.weight)))
        self._block_layers = BlockLayers(layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                                         eps=c.norm_eps)
        self.fuse.proj = BlockProjection(q8(self.fuse.weight), None)
        rows = -len(self._head) % 16  # tiled products hold 16 outputs: zero rows, sliced off
        self._packed_head = BlockProjection(q8(torch.cat([self._head, self._head.new_zeros(rows, self._head.shape[1])])),
                                            None)
        # A causal pass adds the previous draft's input embedding to each slot: the vocabulary's
        # rows, rounded to bf16 (training adds them unrounded: a draft moves only where that
        # rounding decides between two near-equal scores).
        embed = self._embed(self.vocab).to(torch.bfloat16) if self.config.causal else None
        self._draft_pass = BlockDraftPass(self.fuse.proj.weight, self._block_layers, self.slots, self.norm.weight,
                                          self._packed_head.weight, embed)
        return True

    def release_dense_weights(self) -> int:
        """After `use_blocks`, for serving: free the float32 weights that only the float32 path
        and training read (the layers' projections, the fusion's, the output rows: about 50 MB of
        the shipped head, whose passes read their Q8 blocks); a forward with gradients, `pack` or
        saving the head fails from then on. Returns the bytes freed."""
        if self._block_layers is None:
            raise RuntimeError("use_blocks() first: the Q8 blocks are what runs")
        freed = 0
        for module in [self.fuse, *(m for m in self.layers.modules() if isinstance(m, Linear))]:
            if not module.weight.is_meta:
                freed += module.weight.nbytes
                module.weight = nn.Parameter(module.weight.to("meta"), requires_grad=False)
        if self._head is not None:
            freed += self._head.nbytes
            self._head = None
        return freed

    def init_from(self, model: Transformer) -> None:
        """A starting point for training: the base's final norm, the fused input averaging the
        feature and the token's embedding, every slot the mean embedding; the layers keep their
        random initialisation (copies of the base's last layer were worse on held-out replies:
        docs/models.md)."""
        with torch.no_grad():
            self.norm.load_state_dict({k: v.float() for k, v in model.model.norm.state_dict().items()})
            D = self.model_config.dim
            eye = torch.eye(D) * 0.5
            more = torch.zeros(D, D * len(self.config.feature_layers))  # other layers' features: learned from zero
            self.fuse.weight.copy_(torch.cat([more, eye, eye], dim=1))
            every_token = torch.arange(self.model_config.vocab_size, device=model.device)  # the table may be released
            self.slots.copy_(model.embed(every_token).float().mean(0, keepdim=True).expand_as(self.slots))

    def forward(self, feats: Tensor, tokens: Tensor, valid: Tensor, n: int, prev: Tensor | None = None,
                bar: float = 0.0) -> Tensor:
        """feats (B, W, n_features * dim): the feature layers' outputs, then the final normed state;
        prev: a causal head's previous places' tokens (module docstring); bar: a causal head
        drafting on its own stops after the first place where every row's chain confidence (the
        product of its drafts' probabilities) is below bar > 0; the later places' scores are 0."""
        if self._embed is None or self._rope is None or (self._head is None and self._packed_head is None):
            raise RuntimeError("attach(model) first")
        B, W, _ = feats.shape
        T = W + n
        if self._draft_pass is not None and prev is None and not torch.is_grad_enabled():  # `use_blocks`: one C call
            inputs = torch.cat([feats.float(), self._embed(tokens).float()], dim=-1)  # (B, W, n_features * dim + dim)
            cos, sin = self._block_rope(B, T)
            return self._draft_pass(inputs, n, cos, sin, self._block_mask(W, n, valid), bar)[..., : len(self.vocab)]
        if self.config.causal and prev is None:  # place by place, each after the drafts before it
            out = torch.zeros(B, n, len(self.vocab), device=feats.device)
            prev, sure = torch.zeros(B, 0, dtype=torch.long, device=feats.device), 1.0
            for i in range(n):
                out[:, i] = self._layers_pass(feats, tokens, valid, i + 1, prev)[:, -1]
                best = out[:, i].argmax(-1)  # as the engine drafts (softmax can tie what argmax tells apart)
                sure = sure * out[:, i].softmax(-1).gather(-1, best[:, None])[:, 0]
                if i + 1 == n or (bar > 0 and not bool((sure >= bar).any())):  # a NaN: below, as in C
                    return out
                prev = torch.cat([prev, self.vocab[best][:, None]], dim=1)
        return self._layers_pass(feats, tokens, valid, n, prev)

    def _layers_pass(self, feats: Tensor, tokens: Tensor, valid: Tensor, n: int, prev: Tensor | None) -> Tensor:
        """`forward` through the torch layers, every place at once (a causal head's after prev)."""
        B, W, _ = feats.shape
        T = W + n
        dtype = self.fuse.weight.dtype
        ctx = self.fuse(torch.cat([feats.to(dtype), self._embed(tokens).to(dtype)], dim=-1))  # (B, W, D)
        slots = self.slots[:n].to(ctx.dtype)[None].expand(B, -1, -1)
        if prev is not None and n > 1:
            if not self.config.causal or prev.shape != (B, n - 1):
                raise ValueError(f"prev: a causal head's (B, n - 1) = ({B}, {n - 1}) tokens, not {tuple(prev.shape)}")
            slots = torch.cat([slots[:, :1], slots[:, 1:] + self._embed(prev).to(ctx.dtype)], dim=1)
        x = torch.cat([ctx, slots], dim=1)  # (B, W + n, D)
        mask = self._mask(W, n, valid)
        cos, sin = self._rope[0][:T][None].to(x.dtype), self._rope[1][:T][None].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask[:, None], None)
        out = self.norm(x[:, W:])
        if self._packed_head is not None and not torch.is_grad_enabled():
            return self._packed_head(out, 0)[..., : len(self.vocab)].float()
        return (out @ self._head.to(x.dtype).T).float()  # (B, n, V')

    def _pattern(self, W: int, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(keys 0..T-1, the attention pattern without padding (T, T): the context causally, never
        seeing the slots, the slots the whole context and block (a causal head's: those before
        them); the diagonal), T = W + n; made once per shape (a pass's dozen small tensor calls cost
        more than its arithmetic at a step)."""
        key = ("pattern", W, n, device)
        if key not in self._plans:
            keys = torch.arange(W + n, device=device)
            causal = keys[:, None] >= keys[None, :]
            if not self.config.causal:
                causal = (causal & (keys[None, :] < W)) | (keys[:, None] >= W)
            self._plans[key] = (keys, causal, torch.eye(W + n, dtype=torch.bool, device=device))
        return self._plans[key]

    def _mask(self, W: int, n: int, valid: Tensor) -> Tensor:
        """(B, T, T) bool: `_pattern` without the keys of each row's padding (its first W - valid[b]
        context pairs are nobody's keys; each position still sees itself)."""
        keys, causal, eye = self._pattern(W, n, valid.device)
        real = (keys[None, :] >= (W - valid)[:, None]) | (keys[None, :] >= W)  # (B, T)
        return (causal[None] & real[:, None, :]) | eye[None]

    def _block_mask(self, W: int, n: int, valid: Tensor) -> Tensor:
        """`_mask` as the draft pass takes it ((B * T, T) uint8), made once per batch size where
        every row's window is full (a decoding step's usual case: its half dozen tensor calls cost
        a share of the pass)."""
        full = min(valid.tolist(), default=W) >= W
        key = ("block mask", W, n, len(valid), valid.device)
        if full and key in self._plans:
            return self._plans[key]
        mask = self._mask(W, n, valid).reshape(-1, W + n).to(torch.uint8).contiguous()
        if full:
            self._plans[key] = mask
        return mask

    def _block_rope(self, B: int, T: int) -> tuple[Tensor, Tensor]:
        """The RoPE tables of B passes' positions 0..T-1 as the draft pass takes them ((B * T,
        head_dim) each), made once per shape."""
        key = ("block rope", B, T)
        if key not in self._plans:
            self._plans[key] = tuple(table[:T, 0].repeat(B, 1).contiguous() for table in self._rope)
        return self._plans[key]

    def draft_ids(self, index: Tensor) -> Tensor:
        """Indices into the head's vocabulary -> token ids."""
        return self.vocab[index]
