"""
A handwritten Qwen3 (dense) and Qwen3-MoE in one file, the same function as Hugging Face transformers.

Parameter names are the Hub's, verbatim (model.layers.N.self_attn.q_proj.weight, ...): a Hub checkpoint loads
strictly with no rename table, and what save_pretrained writes loads in transformers.AutoModelForCausalLM.

    from model import Qwen3
    m = Qwen3.from_pretrained("Qwen/Qwen3-1.7B", dtype=torch.bfloat16, device="cuda")  # Hub id or folder
    logits = m(idx)                                   # idx (B, T) int64 -> logits (B, T, vocab), model dtype
    h = m(idx, hidden_only=True)                      # (B, T, C) final-normed hidden; apply m.lm_head in chunks
    m.setup_cache(batch_size=1, max_seq_len=4096)     # static KV cache, then m(idx, input_pos=positions)
    m.save_pretrained("out/student")                  # config.json, generation_config.json, safetensors

Numerics follow transformers (RMSNorm, RoPE angles and the MoE router softmax in fp32), with one departure: under
BF16 autocast on a CPU, attention runs in fp32, faster at small head dims and exacter.
"""

import functools
import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Config

SUPPORTED_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Qwen3Config:
    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128  # read from config.json: not hidden/heads for Qwen3-0.6B or 30B-A3B
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    torch_dtype: str = "bfloat16"
    initializer_range: float = 0.02
    # mixture of experts (qwen3_moe only); num_experts = 0 means every layer is a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d, source="config"):
        """Validate a Hugging Face config.json dict; anything we would compute wrongly is a ValueError."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise ValueError(f"{source}: unsupported model_type {mt!r} (supported: {sorted(SUPPORTED_TYPES)})")
        # rope: transformers <5 writes rope_theta/rope_scaling at top level, v5 folds them into rope_parameters
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: unsupported rope type {rope_type!r} (only 'default' RoPE is implemented)")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{source}: no rope_theta (neither top-level nor in rope_parameters)")
        layer_types = d.get("layer_types") or []
        if d.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{source}: sliding-window attention is not supported (use_sliding_window="
                             f"{d.get('use_sliding_window')}, layer_types={sorted(set(layer_types))})")
        if d.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true is not supported (Qwen3 has no attention biases)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {d['hidden_act']!r} (Qwen3 uses silu)")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["rope_theta"] = float(theta)
        kw["torch_dtype"] = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        if kw.get("head_dim") is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if mt == "qwen3_moe":
            kw["num_experts"] = d.get("num_experts", d.get("num_local_experts", 0))
            kw["mlp_only_layers"] = list(d.get("mlp_only_layers") or [])
        else:
            kw["num_experts"] = 0
        kw.setdefault("tie_word_embeddings", False)
        return cls(**kw)  # every key is a field, and every field has a default

    @classmethod
    def from_json(cls, path):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: config.json not found")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def matmul_params(self):
        """Weights that one token multiplies: no embedding lookup; for MoE the router and the top-k experts."""
        C, D = self.hidden_size, self.head_dim
        attn = C * D * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)  # q, o and k, v projections
        n = 0
        for i in range(self.num_hidden_layers):
            mlp = (self.num_experts * C + self.num_experts_per_tok * 3 * C * self.moe_intermediate_size
                   if self.is_moe_layer(i) else 3 * C * self.intermediate_size)  # gate, up, down
            n += attn + mlp
        return n + self.vocab_size * C  # the lm_head

    def flops_per_token(self, seq_len, backward=True):
        """PaLM's model FLOPs per token: a forward 2 N + 4 L T H D (QK^T and AV over the full square); training 3x."""
        fwd = 2 * self.matmul_params() + 4 * self.num_hidden_layers * seq_len * self.num_attention_heads * self.head_dim
        return 3 * fwd if backward else fwd

    def is_moe_layer(self, i):
        # transformers' rule: sparse iff not listed dense, experts exist, and (i+1) % step == 0
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    def to_hf_dict(self):
        """The config.json transformers reads (both the <5 top-level rope keys and v5 rope_parameters)."""
        d = asdict(self)
        d.update(architectures=[SUPPORTED_TYPES[self.model_type]], hidden_act="silu", attention_bias=False,
                 attention_dropout=0.0, use_sliding_window=False, sliding_window=None,
                 max_window_layers=self.num_hidden_layers, rope_scaling=None,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta}, use_cache=True)
        if self.model_type == "qwen3":
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                      "decoder_sparse_step", "mlp_only_layers"):
                d.pop(k)
        else:
            d["num_local_experts"] = self.num_experts  # the v5 spelling of the same field
        return d


# -----------------------------------------------------------------------------
# Pure functions: RoPE

def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions (T,) int -> cos, sin (T, head_dim) in `dtype`; angles in fp32 whatever the model dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D), half-split layout as transformers
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, D), cos/sin (T, D) -> x rotated: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32, cast back to the input dtype, then the weight multiply (transformers' order)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache(nn.Module):
    """Static, preallocated key/value cache (B, n_kv, S, D) written at `input_pos` (gpt-fast style)."""

    def __init__(self, batch_size, n_kv, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos (T,), k/v (B, n_kv, T, D) -> whole caches (B, n_kv, S, D)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        assert self.n_head % self.n_kv == 0, (self.n_head, self.n_kv)
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        # per-head RMSNorm over head_dim only, shared by all heads, applied before RoPE
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.kv_cache = None

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, KV, S, D), masked by position below
        # GQA without materialising repeated K/V: query head h reads kv head h // (H / KV)
        attend = functools.partial(F.scaled_dot_product_attention, attn_mask=mask, is_causal=mask is None,
                                   scale=self.head_dim ** -0.5, enable_gqa=self.n_kv != self.n_head)
        if x.is_cpu and torch.is_autocast_enabled("cpu"):
            # BF16 autocast on a CPU: attention in fp32, faster in torch's CPU flash kernel at small head dims
            with torch.autocast("cpu", enabled=False):
                y = attend(q.float(), k.float(), v.float())
        else:
            y = attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SiluMul(torch.autograd.Function):
    """silu(g) * u, saving only g and u for the backward (silu recomputed there): one (B, T, I) tensor less."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        return torch.ops.aten.silu_backward(dy * u, g), dy * F.silu(g)  # autograd's own silu derivative kernel


class MLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)  # (B, T, intermediate) each
        if g.requires_grad:
            return self.down_proj(SiluMul.apply(g, u))  # SwiGLU
        return self.down_proj(F.silu(g, inplace=True).mul_(u))  # inference: in place, two (B, T, I) buffers, not four


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device_type, dtype):
    """Whether F.grouped_mm (torch >= 2.10) and its backward run for this device type and dtype; probed once."""
    if not hasattr(F, "grouped_mm"):
        return False
    with torch.inference_mode(False), torch.enable_grad():  # the probe's backward also runs under no_grad
        x = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(3, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([3, 3, 8], device=device_type, dtype=torch.int32)
        try:
            y = F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.backward(torch.ones_like(y))
        except (RuntimeError, NotImplementedError):
            return False
    return True


class SparseMoeBlock(nn.Module):
    """Top-k routed experts, run one of two equal ways (`impl`): "loop", each expert on its tokens in ascending order
    as transformers sums them (one host sync), or "grouped", torch's grouped matmul over all experts (no sync); "auto":
    grouped wherever torch runs it. The weights live in three stacked tensors, gate and up (E, I, C), down (E, C, I);
    each expert's Parameter is a view of one row, so the Hub names stay and the grouped matmul reads them in place."""

    def __init__(self, cfg, impl="auto"):
        super().__init__()
        self.top_k, self.norm_topk_prob, self.impl = cfg.num_experts_per_tok, cfg.norm_topk_prob, impl
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.stacked, self.rows = None, None  # (gate, up, down) stacked weights; data pointers of their rows
        self.stack_experts()
        # load_state_dict(assign=True) gives the experts fresh tensors (conversions such as .to: _apply below)
        self.register_load_state_dict_post_hook(SparseMoeBlock._after_load)

    def expert_weights(self):
        """[gate weights], [up weights], [down weights], each a list of E Parameters."""
        return [[getattr(e, n).weight for e in self.experts] for n in ("gate_proj", "up_proj", "down_proj")]

    def stack_experts(self, device=None, dtype=None):
        """Copy the experts' weights into fresh stacked tensors (on `device`, in `dtype`; meta ones left unfilled) and
        make each expert's Parameter a view of its row. A no-op when they already are."""
        groups = self.expert_weights()
        if device is None and dtype is None and self.rows == [p.data_ptr() for ps in groups for p in ps]:
            return
        stacked = []
        for name, ps in zip(("gate_proj", "up_proj", "down_proj"), groups):
            s = torch.empty((len(ps), *ps[0].shape), dtype=dtype or ps[0].dtype, device=device or ps[0].device)
            for e, p in enumerate(ps):
                if p.is_meta != s.is_meta:  # meta <-> real: a new Parameter under the same name
                    getattr(self.experts[e], name).weight = nn.Parameter(s[e], requires_grad=p.requires_grad)
                    continue
                if not p.is_meta:
                    s[e].copy_(p.detach())
                p.data = s[e]  # the Parameter object (and its name) stays; its storage is now row e
            stacked.append(s)
        self.stacked = tuple(stacked)
        self.rows = [p.data_ptr() for ps in self.expert_weights() for p in ps]

    @staticmethod
    def _after_load(module, incompatible_keys):
        module.stack_experts()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(), .cuda(), .float(): every expert weight may be a new tensor now
        self.stack_experts()
        return self

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)  # (N, C)
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E), over all experts in fp32
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype).reshape(-1)  # (N*k,)
        # group the N*k (token, expert) pairs by expert with one stable sort
        experts, order = torch.sort(chosen.reshape(-1), stable=True)  # (N*k,) each
        token_of = order // self.top_k  # (N*k,) token index of each sorted pair
        # the matmuls' dtype: the autocast one, or the weights' (the grouped matmul is not autocast-aware)
        dev = x.device.type
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if autocast else self.stacked[0].dtype
        if self.impl == "grouped" or (self.impl == "auto" and grouped_mm_runs(dev, dt)):
            return self.grouped(x, experts, order, token_of, weights, dt).view(B, T, C)
        return self.loop(x, experts, order, token_of, weights).view(B, T, C)

    def loop(self, x, experts, order, token_of, weights):
        counts = torch.bincount(experts, minlength=len(self.experts)).tolist()  # the host sync
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):  # ascending expert order, as transformers sums them
            if n == 0:
                continue
            tok = token_of[start:start + n]
            y = self.experts[e](x[tok]) * weights[order[start:start + n], None]  # (n, C)
            out.index_add_(0, tok, y)
            start += n
        return out

    def grouped(self, x, experts, order, token_of, weights, dt):
        E = len(self.experts)
        # offs[e] = end row of expert e in the sorted pairs, found on the device (bincount would sync on CUDA)
        offs = torch.searchsorted(experts, torch.arange(E, device=x.device, dtype=experts.dtype), right=True)
        offs = offs.to(torch.int32)  # (E,)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.experts.parameters()):
            Wg, Wu, Wd = (torch.stack(ps) for ps in self.expert_weights())  # autograd reaches each expert's weight
        else:
            self.stack_experts()  # no-op unless the weights were replaced behind our back
            Wg, Wu, Wd = self.stacked
        Wg, Wu, Wd = Wg.to(dt), Wu.to(dt), Wd.to(dt)  # what F.linear under autocast would cast
        xs = x[token_of].to(dt)  # (N*k, C) rows sorted by expert
        h = SiluMul.apply(F.grouped_mm(xs, Wg.transpose(-2, -1), offs=offs),  # (N*k, I)
                          F.grouped_mm(xs, Wu.transpose(-2, -1), offs=offs))
        y = F.grouped_mm(h, Wd.transpose(-2, -1), offs=offs) * weights[order, None].to(dt)  # (N*k, C)
        # back to (token, slot) order, then the k expert outputs of each token summed (deterministic, no atomics)
        y = torch.empty_like(y).index_copy_(0, order, y)
        return y.view(-1, self.top_k, y.shape[-1]).sum(1).to(x.dtype)  # (N, C)


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.generation_config = {}
        self.max_seq_len = 0  # > 0 once setup_cache has run
        self.rope_table = self.causal_table = None

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed=0):
        """N(0, initializer_range) matrices, unit norms, drawn on the CPU whatever the device (one seed, one model)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # tied lm_head appears once
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device="cpu") * self.config.initializer_range)
        return self

    def set_moe_impl(self, impl):
        """How every MoE block runs its experts: "loop", "grouped" or "auto" (see SparseMoeBlock). Returns self."""
        if impl not in ("loop", "grouped", "auto"):
            raise ValueError(f"MoE impl {impl!r}: expected loop, grouped or auto")
        for blk in self.model.layers:
            if isinstance(blk.mlp, SparseMoeBlock):
                blk.mlp.impl = impl
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def setup_cache(self, batch_size, max_seq_len):
        """Preallocate a KV cache for decoding; forward then needs input_pos."""
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        w = self.model.embed_tokens.weight
        for blk in self.model.layers:
            a = blk.self_attn
            a.kv_cache = KVCache(batch_size, a.n_kv, max_seq_len, a.head_dim, w.dtype, w.device)
        self.max_seq_len = max_seq_len
        # decoding reads these by position instead of recomputing them every token (the same values, row by row)
        pos = torch.arange(max_seq_len, device=w.device)
        self.rope_table = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, w.dtype)  # 2 x (S, D)
        self.causal_table = pos[:, None] >= pos[None, :]  # (S, S): position i attends to cached j <= i

    def clear_cache(self):
        for blk in self.model.layers:
            blk.self_attn.kv_cache = None
        self.max_seq_len = 0
        self.rope_table = self.causal_table = None

    def forward(self, idx, input_pos=None, hidden_only=False, head_fn=None):
        """idx (B, T) -> logits (B, T, V) in the model dtype, or final-normed hidden states (B, T, C). input_pos (T,):
        the tokens' positions (default 0..T-1); with a KV cache they attend to every cached position <= their own.
        head_fn(h (B, T, C), lm_head weight (V, C)) -> its result instead of the logits: a loss that applies the head
        itself, inside forward, where FSDP has gathered a sharded head's weight (train.py --fsdp)."""
        B, T = idx.shape
        if input_pos is None:
            if self.max_seq_len:
                raise ValueError("a KV cache is set up: pass input_pos")
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
            input_pos = torch.arange(T, device=idx.device)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        # (T, S) bool: what each token may attend to in the cache; None = causal over the T tokens
        mask = self.causal_table[input_pos] if self.max_seq_len else None
        if self.max_seq_len and self.rope_table[0].dtype == x.dtype:  # decoding: the tables of setup_cache
            cos, sin = self.rope_table[0][input_pos], self.rope_table[1][input_pos]  # (T, D) each
        else:
            cos, sin = rope_cos_sin(input_pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        for blk in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, cos, sin, input_pos, mask, use_reentrant=False)
            else:
                x = blk(x, cos, sin, input_pos, mask)
        x = self.model.norm(x)
        if head_fn is not None:
            return head_fn(x, self.lm_head.weight)
        return x if hidden_only else self.lm_head(x)

    # -------------------------------------------------------------------------
    # Checkpoints in the Hugging Face layout

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device="cpu"):
        """Load a local folder or a Hub repo id (dtype None: the config's), built on meta and read from the
        memory-mapped safetensors straight onto `device`: host memory peaks near one copy of the weights."""
        folder = resolve_folder(name_or_path)
        config, index, optional = cls.check_pretrained(folder)  # names and shapes checked from the headers first
        dtype = dtype or DTYPES.get(config.torch_dtype, torch.float32)
        with torch.device("meta"):
            model = cls(config)
        model.load_weights(index, [k for k in index if k not in optional], dtype, device)
        model.tie_weights()  # assign=True replaced the Parameter objects
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as fh:
                model.generation_config = json.load(fh)
        return model

    def load_weights(self, index, keys, dtype, device):
        """Read the tensors `keys` of a checkpoint_index into this model, built on meta, one layer at a time: a MoE
        layer's stacked experts are allocated on `device` and filled in place, every other tensor is assigned."""
        by_layer = {}
        for k in keys:
            by_layer.setdefault(k.split(".")[2] if k.startswith("model.layers.") else "", []).append(k)
        for layer, names in by_layer.items():
            mlp = self.model.layers[int(layer)].mlp if layer else None
            if isinstance(mlp, SparseMoeBlock) and mlp.stacked[0].is_meta:
                mlp.stack_experts(device=device, dtype=dtype)
            params = dict(self.named_parameters())
            rows = [k for k in names if k in params and not params[k].is_meta]  # rows of the stacked experts
            with torch.no_grad():
                for k, t in load_tensors(index, rows, dtype, "cpu").items():  # mmap views, cast if need be
                    params[k].copy_(t)
            sd = load_tensors(index, [k for k in names if k not in rows], dtype, device)
            self.load_state_dict(sd, strict=False, assign=True)  # everything else: the tensors themselves

    @classmethod
    def check_pretrained(cls, folder):
        """(config, checkpoint_index, optional names) of a model folder from config.json and the safetensors headers
        alone: a ValueError names a missing, unexpected, misshapen or truncated tensor before any tensor is read."""
        config = Qwen3Config.from_json(os.path.join(folder, "config.json"))
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        optional = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: a stored copy is ignored
        return config, checkpoint_index(folder, expected, optional), optional

    def save_pretrained(self, out_dir, max_shard_bytes=5 * 2**30, dtype=None, state_dict=None):
        """config.json, generation_config.json and model.safetensors (or shards plus index), written atomically.
        dtype: save the tensors in this dtype (e.g. bfloat16 for inference) without touching the model's.
        state_dict: the tensors to save instead of this model's (a sharded model's, gathered: train.py --fsdp)."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu()
              for k, v in (self.state_dict() if state_dict is None else state_dict).items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # transformers re-ties it from embed_tokens
        dtype = next(iter(sd.values())).dtype
        cfg = self.config.to_hf_dict()
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if cur and size + n > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += n
        shards.append(cur)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            tmp = os.path.join(out_dir, name + ".tmp")
            save_file(shard, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(out_dir, name))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
            write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
        gen = dict(self.generation_config) or {"bos_token_id": self.config.bos_token_id,
                                               "eos_token_id": self.config.eos_token_id}
        write_json(os.path.join(out_dir, "generation_config.json"), gen)
        write_json(os.path.join(out_dir, "config.json"), cfg)  # last: a folder with config.json is complete


# -----------------------------------------------------------------------------
# Checkpoint helpers

def resolve_folder(name_or_path):
    """A local folder as is; otherwise a Hub repo id fetched (or found in the local cache) by huggingface_hub."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if (os.path.exists(name_or_path) or name_or_path.count("/") != 1 or name_or_path.startswith((".", "/"))
            or os.path.isdir(name_or_path.split("/")[0])  # out/studnet: a typo in a local path, not a Hub id
            or name_or_path.lower().endswith((".json", ".jsonl", ".safetensors", ".bin", ".parquet"))):  # a file
        raise ValueError(f"{name_or_path}: not a model folder and not a Hub repo id of the form org/name")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_path, allow_patterns=[
            "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"])
    except Exception as e:  # offline with no cached copy, unknown repo, no network, ...
        why = " ".join(str(e).split())  # one line
        raise ValueError(f"{name_or_path}: no such local folder, and not found on the Hugging Face Hub or in its "
                         f"local cache ({type(e).__name__}: {why})") from None


def weight_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                names = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
        files = [os.path.join(folder, n) for n in names]
        for p in files:
            if not os.path.isfile(p):
                raise ValueError(f"{index}: lists shard {os.path.basename(p)}, which is missing")
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json (.bin files are never read)")


def read_header(path):
    """The header of a safetensors file, {name: {"dtype", "shape", "data_offsets"}}, checked against the file size:
    a ValueError names the file when it is truncated or corrupt."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file or its header is corrupt")
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header


def checkpoint_index(folder, expected, optional=()):
    """{name: (file, shape, bytes in the file)} of a checkpoint from its headers, checked against the model's
    {name: shape}: a ValueError names the missing, unexpected and misshapen tensors (`optional` may be absent)."""
    found = {}
    for path in weight_files(folder):
        for k, v in read_header(path).items():
            found[k] = (path, tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        layers = sorted({int(k.split(".")[2]) for k in missing if k.startswith("model.layers.")})
        raise ValueError(f"{folder}: checkpoint does not match the config: missing tensors {_few(missing)}"
                         f"{f' (of layers {layers})' if layers else ''}, unexpected tensors {_few(unexpected)}")
    for k, (path, shape, _) in found.items():
        if shape != expected[k]:
            raise ValueError(f"{path}: tensor {k} has shape {list(shape)}, config expects {list(expected[k])}")
    return found


def load_tensors(index, names, dtype, device):
    """{name: tensor} for `names` of a checkpoint_index, read from the memory-mapped files onto `device` in `dtype`."""
    from safetensors import SafetensorError, safe_open
    by_file = {}
    for k in names:
        by_file.setdefault(index[k][0], []).append(k)
    out = {}
    for path, keys in by_file.items():
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for k in keys:
                    out[k] = f.get_tensor(k).to(dtype)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path}: cannot read safetensors ({e})") from None
    return out


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _few(names, n=5):
    return f"{names[:n]}{f' and {len(names) - n} more' if len(names) > n else ''}"
