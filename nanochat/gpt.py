"""
The GPT model (nanochat, Oct 2025 design), in one file.

    idx -> wte -> RMSNorm -> N x Block -> RMSNorm -> lm_head -> 15*tanh(logits/15)
    Block: x + attn(norm(x)); x + mlp(norm(x))
    attn:  q,k,v (grouped-query: n_kv_head divides n_head), rotary, RMSNorm on q and k, SDPA, output proj
    mlp:   Linear 4x -> relu(x)^2 -> Linear back

No biases, parameter-free RMSNorms, untied embedding and lm_head. Width follows depth
(config_from_depth): d20 is 1280 wide, 10 heads, 560,988,160 parameters at vocab 65,536.
To build a big model without touching memory twice, build on the meta device, then move and
initialise; init_weights() also rebuilds the rotary tables (kept out of checkpoints), so call it
even when a state_dict is loaded next:
    with torch.device("meta"): model = GPT(config)
    model.to_empty(device=device); model.init_weights()
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanochat.common import get_dist_info
from nanochat.lm_loss import chunked_softcap_cross_entropy, plain_softcap_cross_entropy
from nanochat.optim import build_optimizers

LOGIT_SOFTCAP = 15.0
HEAD_DIM = 128  # config_from_depth keeps heads this wide; width grows by adding heads
ROTARY_BASE = 10000
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover 10x sequence_len, room for long generations

# Which fused attention kernel scaled_dot_product_attention tries first for full-sequence
# forwards (training, scoring, embedding). PyTorch's own order ("auto") is flash,
# memory-efficient, math, cuDNN, so cuDNN is never picked; "cudnn" (the default) puts it first:
# at d20, B=32, T=2048 on an H100 it made training 7% faster than flash (dev/bench_gpt.py). A
# call it cannot serve falls through to the next. A backend switched off with
# torch.backends.cuda.enable_*_sdp(False) before the model is built (or before
# set_attention_backend) stays off. Decoding with a KV cache always keeps PyTorch's order, the
# one the engine's figures were measured with.
ATTENTION_BACKENDS = {
    "auto": None,
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads; fewer than n_head is grouped-query attention
    n_embd: int = 1280

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                f"(grouped-query attention shares each key/value head among n_head/n_kv_head query heads); "
                f"pick one of {[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}"
            )


def config_from_depth(depth: int, vocab_size: int = 65536, sequence_len: int = 2048, n_kv_head: int | None = None) -> GPTConfig:
    """The model size from one knob: n_embd = 64*depth, heads 128 wide (fewer, wider ones for tiny models)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    n_embd = 64 * depth
    n_head = max(1, math.ceil(n_embd / HEAD_DIM))
    while n_embd % n_head != 0:  # odd depths from 5: depth 5 is 320 wide -> 4 heads of 80 (3 would not divide)
        n_head += 1
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


def norm(x):
    # parameter-free RMSNorm: nothing to learn, nothing to decay, one fused kernel
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """
    Rotate pairs (x[..., i], x[..., i + d/2]) by position-dependent angles. x: (B, T, H, D);
    cos, sin: (..., d/2). The same products as y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin, written
    as x * [cos, cos] + roll(x, d/2) * [sin, -sin] over whole rows: compiled, the backward pass of
    rotary and QK norm then runs 6 ms per micro-batch at d20 instead of 15 (slices and a cat),
    1.5% of a training step on an H100 (dev/PERF_NOTES.md).
    """
    d = x.shape[-1] // 2
    cos2, sin2 = torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)
    return (x * cos2 + torch.roll(x, d, dims=-1) * sin2).to(x.dtype)


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """
    Keys and values for every layer, preallocated once for the whole batch:
    k, v have shape (n_layer, B, n_kv_head, max_seq_len, head_dim). Never grown in place.

    All rows share one write position `pos`. Row b is left-padded by pad[b] positions, so a
    token at cache index i sits at rotary position i - pad[b], and attention ignores keys at
    indices < pad[b]: a padded row computes what it would alone, and rows of different
    prompt lengths decode in lockstep.
    """

    def __init__(self, batch_size, num_kv_heads, max_seq_len, head_dim, num_layers, device, dtype, pad=None):
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        # zeros, not empty: padded positions are read (then masked) and must never hold NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.pos_t = None  # the write position as a device tensor, once use_device_position() is called
        self.set_padding(pad)

    @classmethod
    def for_model(cls, model, batch_size, max_seq_len, dtype, pad=None):
        c = model.config
        return cls(batch_size, c.n_kv_head, max_seq_len, c.n_embd // c.n_head, c.n_layer,
                   model.get_device(), dtype, pad=pad)

    @property
    def batch_size(self):
        return self.k.size(1)

    @property
    def max_seq_len(self):
        return self.k.size(3)

    @property
    def dtype(self):
        return self.k.dtype

    def set_padding(self, pad):
        """pad: per-row count of left-padding positions (list or LongTensor of length B), or None."""
        pad_list = [0] * self.batch_size if pad is None else [int(p) for p in (pad.tolist() if torch.is_tensor(pad) else pad)]
        if len(pad_list) != self.batch_size:
            raise ValueError(f"pad has {len(pad_list)} entries but the cache holds {self.batch_size} rows")
        if any(p < 0 or p >= self.max_seq_len for p in pad_list):
            raise ValueError(f"pad values must lie in [0, {self.max_seq_len}), got {pad_list}")
        # known on the host so forward() can pick the mask-free fast path without a device sync
        self.has_padding = any(p > 0 for p in pad_list)
        self.pad = torch.tensor(pad_list, dtype=torch.long, device=self.k.device)

    def reset(self):
        self.pos = 0
        self.pos_t = None
        self.set_padding(None)

    def use_device_position(self):
        """
        Decode with fixed shapes from here on, as CUDA graphs need: the write position lives in
        the device tensor pos_t, each step writes one token there and attends over the whole
        cache with everything past pos_t masked. The host-side `pos` stops being updated.
        """
        self.pos_t = torch.tensor(self.pos, dtype=torch.long, device=self.k.device)

    def write(self, layer_idx, k, v):
        """Store k, v (B, H_kv, T, D) at pos..pos+T of a layer; return all keys/values up to there."""
        T = k.size(2)
        if self.pos_t is not None:
            # no host-side bounds check here (the position is on the device); the caller sized the cache
            self.k[layer_idx].index_copy_(2, self.pos_t.view(1), k)
            self.v[layer_idx].index_copy_(2, self.pos_t.view(1), v)
            return self.k[layer_idx], self.v[layer_idx]
        if self.pos + T > self.max_seq_len:
            raise ValueError(f"KV cache overflow: pos {self.pos} + {T} new tokens > max_seq_len {self.max_seq_len}")
        if k.dtype != self.dtype:
            raise TypeError(f"KV cache holds {self.dtype} but the model computed {k.dtype} keys; "
                            f"build the cache with the dtype the forward pass runs in (bf16 under autocast)")
        end = self.pos + T
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, num_tokens):
        if self.pos_t is not None:
            self.pos_t.add_(num_tokens)
        else:
            self.pos += num_tokens

    def prefill_from(self, other, row_indices=None):
        """Copy other's first other.pos positions into this cache; row r of self gets row row_indices[r] of other."""
        if row_indices is None:
            row_indices = list(range(other.batch_size))
        if len(row_indices) != self.batch_size:
            raise ValueError(f"{len(row_indices)} row indices for a cache of {self.batch_size} rows")
        if other.pos_t is not None:
            raise ValueError("cannot copy from a cache whose position lives on the device (after use_device_position)")
        if other.pos > self.max_seq_len:
            raise ValueError(f"source cache holds {other.pos} positions, more than this cache's {self.max_seq_len}")
        layers_heads_dim = lambda cache: (cache.k.size(0), cache.k.size(2), cache.k.size(4))
        if layers_heads_dim(other) != layers_heads_dim(self):
            raise ValueError(f"cache shapes differ beyond batch and length: {tuple(other.k.shape)} vs {tuple(self.k.shape)}")
        rows = torch.as_tensor(row_indices, dtype=torch.long, device=other.k.device)
        n = other.pos
        self.k[:, :, :, :n] = other.k[:, :, :, :n].index_select(1, rows).to(self.dtype)
        self.v[:, :, :, :n] = other.v[:, :, :, :n].index_select(1, rows).to(self.dtype)
        self.pos = n
        self.set_padding(other.pad.index_select(0, rows))

    def replicate(self, row_indices, max_seq_len=None):
        """A new cache whose row r copies row row_indices[r] of this one (one prompt -> many samples)."""
        _, _, heads, length, head_dim = self.k.shape
        new = KVCache(len(row_indices), heads, max_seq_len or length, head_dim, self.k.size(0),
                      self.k.device, self.dtype)
        new.prefill_from(self, row_indices)
        return new


# -----------------------------------------------------------------------------
# The model

_SDP_ENABLED = {
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
}


def _attention_order(name):
    """The backends of ATTENTION_BACKENDS[name] that are switched on now, in order (None: PyTorch's order).
    Read once, outside the forward pass: querying them there would break torch.compile's graph."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    backends = ATTENTION_BACKENDS[name]
    return None if backends is None else [b for b in backends if _SDP_ENABLED[b]()] or None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attention_order = _attention_order("cudnn")  # GPT.set_attention_backend changes it

    def _attend(self, q, k, v, full_sequence, **kwargs):
        # Only full-sequence forwards (training, scoring, embedding) reorder the kernels: decoding
        # runs from chat_web's worker threads, and sdpa_kernel changes process-wide settings.
        backends = self.attention_order if full_sequence else None
        gqa = self.n_kv_head != self.n_head
        if not backends:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)
        with sdpa_kernel(backends, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)

    def forward(self, x, cos_sin, attn_mask, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm keeps attention logits bounded
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.write(self.layer_idx, k, v)
        if attn_mask is None:
            # without a cache, or decoding one token with no padding: plain causal (or full) attention
            is_causal = kv_cache is None or (kv_cache.pos == 0 and T > 1)
            y = self._attend(q, k, v, kv_cache is None, is_causal=is_causal)
        else:
            y = self._attend(q, k, v, False, attn_mask=attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


def relu_squared(h):
    # r * r rather than square(): CUDA autocast runs pow in fp32, and the bf16 cast of its result
    # would then happen outside MLP's checkpoint and be kept for the backward pass after all.
    # The values are the same: the product of two bf16 numbers is exact in fp32 before rounding.
    r = F.relu(h)
    return r * r


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        # Compiled training (base_train, mid_train) keeps only h for the backward pass and
        # recomputes relu(h)^2 from it (one cheap elementwise pass); saving both cost 10 KB per
        # token per layer, 13 GB at d20 with B=32, T=2048. In eager mode the checkpoint would save
        # nothing (c_proj keeps its input anyway) and only add the recomputation, so it is skipped.
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and h.requires_grad:
            a = torch.utils.checkpoint.checkpoint(relu_squared, h, use_reentrant=False)
        else:
            a = relu_squared(h)
        return self.c_proj(a)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, attn_mask, kv_cache):
        x = x + self.attn(norm(x), cos_sin, attn_mask, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # "chunked" is the training default: it never materialises fp32 logits for the whole batch
        # (nanochat/lm_loss.py), which keeps d20 at B=32, T=2048 far below nanochat's 75 GB peak;
        # "plain" materialises all logits (kept to check against)
        self.loss_impl = "chunked"
        self.rotary_seq_len = config.sequence_len * ROTARY_LENGTH_FACTOR
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)  # derived from the config: kept out of checkpoints
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # nanochat's init: 1/sqrt(fan_in), shrunk further for wide-to-narrow projections
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        # Output projections start at zero so every block begins as the identity; the q/k/v and
        # c_fc weights still get gradients through the residual stream, so nothing is stuck.
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # Small, not zero: a zero lm_head passes no gradient back into the network, and a tiny
        # model trained for a few steps then never learns more than the unigram distribution.
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        device = self.lm_head.weight.device
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, self.config.n_embd // self.config.n_head, device=device)
        self.cos, self.sin = cos, sin
        if device.type == "cuda":
            # the embedding table is the largest tensor that is only gathered from; bf16 halves it
            self.transformer.wte.to(dtype=torch.bfloat16)

    @torch.no_grad()
    def randomize_outputs(self, lm_head_std: float = 0.02, proj_std: float = 0.02):
        """Noise where init_weights starts the output projections at zero and lm_head near it: an
        untrained model whose every block does real work and whose samples vary (benchmarks)."""
        for block in self.transformer.h:
            block.attn.c_proj.weight.normal_(0, proj_std)
            block.mlp.c_proj.weight.normal_(0, proj_std)
        self.lm_head.weight.normal_(0, lm_head_std)

    def fit_seq_len(self, max_seq_len: int) -> int:
        """A fine-tuning stage's row length: --max_seq_len, or the trained sequence_len when it is -1."""
        seq_len = max_seq_len if max_seq_len > 0 else self.config.sequence_len
        if seq_len > self.rotary_seq_len:
            raise ValueError(f"--max_seq_len={seq_len} exceeds the model's rotary table of {self.rotary_seq_len} positions")
        return seq_len

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=ROTARY_BASE, device=None):
        device = device if device is not None else self.lm_head.weight.device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if device.type == "cuda":
            cos, sin = cos.bfloat16(), sin.bfloat16()  # matches the bf16 activations under autocast
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2) broadcasts over (B, T, H, D/2)

    def get_device(self):
        return self.lm_head.weight.device

    def set_attention_backend(self, name):
        """Which attention kernel to try first: a key of ATTENTION_BACKENDS ("auto" is PyTorch's order)."""
        order = _attention_order(name)
        for block in self.transformer.h:
            block.attn.attention_order = order

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token: 6 per non-embedding weight (forward + backward) plus attention's score/value products."""
        nparams_embedding = self.transformer.wte.weight.numel()
        c = self.config
        l, h, q, t = c.n_layer, c.n_head, c.n_embd // c.n_head, c.sequence_len
        return 6 * (self.num_params() - nparams_embedding) + 12 * l * h * q * t

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, ddp=None,
                         init_lr_frac=1.0):
        """[AdamW for lm_head and wte, Muon for every block matrix] (nanochat's split; see nanochat/optim.py).
        ddp=None reads torchrun's environment; under DDP these are DistAdamW and DistMuon."""
        ddp = get_dist_info()[0] if ddp is None else ddp
        return build_optimizers(self.transformer.h.parameters(), self.transformer.wte.parameters(),
                                self.lm_head.parameters(), self.config.n_embd, ddp=ddp,
                                unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                matrix_lr=matrix_lr, weight_decay=weight_decay, init_lr_frac=init_lr_frac)

    # -------------------------------------------------------------------------
    # forward

    def _rotary_and_mask(self, B, T, kv_cache, device):
        """Rotary (cos, sin) for the new tokens and the attention mask (None when SDPA's own causal flag suffices)."""
        if kv_cache is not None and kv_cache.pos_t is not None:
            return self._rotary_and_mask_at_device_position(B, T, kv_cache, device)
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + T > self.rotary_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the rotary table of {self.rotary_seq_len} positions")
        if kv_cache is None or (not kv_cache.has_padding and (T == 1 or pos == 0)):
            return (self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]), None
        query_index = pos + torch.arange(T, device=device)  # cache index of each new token
        key_index = torch.arange(pos + T, device=device)
        pad = kv_cache.pad
        # rotary position = cache index - row padding; padded slots get position 0 (they are masked anyway)
        positions = (query_index[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        cos = self.cos[0, :, 0].index_select(0, positions.view(-1)).view(B, T, 1, -1)
        sin = self.sin[0, :, 0].index_select(0, positions.view(-1)).view(B, T, 1, -1)
        causal = key_index[None, None, :] <= query_index[None, :, None]  # (1, T, Tk)
        real = key_index[None, None, :] >= pad[:, None, None]  # (B, 1, Tk)
        # A padding query would see no key at all, and an all-masked softmax is NaN; let it see
        # itself, so padding slots hold finite values that real queries then mask out.
        itself = key_index[None, None, :] == query_index[None, :, None]
        mask = (causal & real) | itself  # (B, T, Tk)
        return (cos, sin), mask.unsqueeze(1)

    def _rotary_and_mask_at_device_position(self, B, T, kv_cache, device):
        """The fixed-shape decode step (see KVCache.use_device_position): one token per row."""
        if T != 1:
            raise ValueError(f"a cache with a device-side position decodes one token per row, got {T}")
        positions = (kv_cache.pos_t - kv_cache.pad).clamp(min=0)  # (B,)
        cos = self.cos[0, :, 0].index_select(0, positions).view(B, 1, 1, -1)
        sin = self.sin[0, :, 0].index_select(0, positions).view(B, 1, 1, -1)
        key_index = torch.arange(kv_cache.max_seq_len, device=device)
        mask = (key_index[None, :] >= kv_cache.pad[:, None]) & (key_index[None, :] <= kv_cache.pos_t)  # (B, Tk)
        return (cos, sin), mask[:, None, None, :]

    def forward_hidden(self, idx, kv_cache=None):
        """Final RMSNorm'd hidden states (B, T, n_embd): what embeddings and the reward model read."""
        B, T = idx.size()
        cos_sin, attn_mask = self._rotary_and_mask(B, T, kv_cache, idx.device)
        x = self.transformer.wte(idx)
        if not torch.is_autocast_enabled(idx.device.type):
            x = x.to(self.lm_head.weight.dtype)  # a bf16 table (CUDA init) must not leak bf16 into fp32 layers
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        With targets: the cross-entropy of the soft-capped logits, targets == -1 ignored.
          "mean" averages over counted tokens and is 0 (not NaN) when none is counted;
          "sum" sums them; "none" returns (B, T) per-token losses, 0 where ignored.
        Without targets: fp32 soft-capped logits (B, T, vocab_size). With a kv_cache, idx holds
        the next T tokens of every row, written at cache positions pos..pos+T.
        """
        x = self.forward_hidden(idx, kv_cache=kv_cache)
        if targets is not None:
            loss_fn = chunked_softcap_cross_entropy if self.loss_impl == "chunked" else plain_softcap_cross_entropy
            loss = loss_fn(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), LOGIT_SOFTCAP, loss_reduction)
            return loss.view_as(targets) if loss_reduction == "none" else loss
        return self.logits_from_hidden(x)

    def logits_from_hidden(self, hidden):
        """fp32 soft-capped logits for hidden states from forward_hidden (e.g. only the last position)."""
        logits = self.lm_head(hidden).float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
