"""A plain PyTorch GPT that runs what samoe_dist trains: dense, standard-MoE and SaMoE models.

Only torch (and safetensors for the weights): no megatron-core, no DeepSpeed, no process groups,
no other samoe_dist module, so this file can be copied on its own. ``tools/convert_checkpoint.py
export`` writes the weights and the ``.json`` config it loads. The math is megatron-core 0.16.1's
as the trainer builds it (GPTModel, local layer spec, TP = PP = 1, no biases in linear layers), so
the logits equal the training model's to fp32 rounding:

- pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, a final norm, and an output layer
  tied to the token embedding unless untied; LayerNorm (with bias) or RMSNorm, eps 1e-5.
- attention: fused qkv, scores scaled by 1/sqrt(head_dim), causal; RoPE (megatron's
  RotaryEmbedding: inv_freq = base^(-2i/d), non-interleaved halves, applied to q and k) or
  learned absolute position embeddings added to the token embeddings.
- MLP: ``gelu(x W1^T) W2^T`` (exact erf gelu), or SwiGLU with fc1 rows ``[gate; up]``:
  ``(silu(x Wg^T) * (x Wu^T)) W2^T``.
- MoE layer, dropless: router logits ``x Wr^T``; pre-softmax: gates = top-k of softmax over all N
  (not renormalised), otherwise softmax over the top-k logits; ``y = sum_k gate_k * expert_k(x)``,
  the gate applied to the fc2 input as megatron does.
- SaMoE layer: the same, with layer expert ``e = sum_p A[e, p] * pool[p]``,
  ``A = softmax(C / tau)``, only the top-m logits of a row kept when ``0 < m < P``, or ``A = C``
  (a linear combination); with shared routing the layer's N = P experts are the pool's (DESIGN.md §2).

One layout differs from megatron's: ``attn.qkv.weight`` rows are ``[q heads; k heads; v heads]``
(megatron interleaves them per head); ``samoe_dist.export.names`` converts between the two exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "samoe-plain-gpt"
_METADATA_KEYS = ("format", "version", "kind", "training_config")


@dataclass
class PlainGPTConfig:
    """Everything the plain model needs; the fields of ``model.json``."""

    vocab_size: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int  # dense layers' FFN size f
    max_position_embeddings: int  # longest context (generate crops to it)
    position_embedding_type: str = "rope"  # 'rope' or 'learned_absolute'
    rotary_base: float = 10000
    rotary_percent: float = 1.0  # fraction of each head's dims that RoPE rotates
    normalization: str = "LayerNorm"  # 'LayerNorm' or 'RMSNorm'
    norm_epsilon: float = 1e-5
    activation: str = "gelu"  # 'gelu' or 'swiglu'
    tie_word_embeddings: bool = True
    moe_layers: list = field(default_factory=list)  # 0-based indices of the MoE layers
    num_experts: Optional[int] = None  # N experts per MoE layer
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_router_pre_softmax: bool = True
    samoe_pool_size: Optional[int] = None  # P: the MoE layers are SaMoE layers when set
    samoe_temperature: float = 1.0
    samoe_top_m: int = 0
    samoe_combination: str = "softmax"  # 'softmax': A = softmax(C / tau); 'linear': A = C
    samoe_route_to_pool: bool = False  # shared routing: layer expert e is pool expert e (N = P, no C)

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(f"PlainGPTConfig: {message}")

        for name in ("vocab_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        need(self.position_embedding_type in ("rope", "learned_absolute"),
             f"position_embedding_type must be 'rope' or 'learned_absolute', got {self.position_embedding_type!r}")
        need(self.normalization in ("LayerNorm", "RMSNorm"),
             f"normalization must be 'LayerNorm' or 'RMSNorm', got {self.normalization!r}")
        need(self.activation in ("gelu", "swiglu"), f"activation must be 'gelu' or 'swiglu', got {self.activation!r}")
        need(0.0 < self.rotary_percent <= 1.0, f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        need(all(0 <= i < self.num_layers for i in self.moe_layers)
             and len(set(self.moe_layers)) == len(self.moe_layers),
             f"moe_layers {self.moe_layers} must be distinct layer indices in [0, {self.num_layers})")
        if self.moe_layers:
            need(self.num_experts is not None and self.num_experts > 0, "moe_layers need num_experts > 0")
            need(0 < self.moe_router_topk <= self.num_experts,
                 f"moe_router_topk {self.moe_router_topk} must be in [1, num_experts {self.num_experts}]")
            if self.moe_ffn_hidden_size is None:
                self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.samoe_pool_size is not None:
            need(bool(self.moe_layers), "samoe_pool_size needs MoE layers (moe_layers, num_experts)")
            need(self.samoe_pool_size > 0 and self.samoe_temperature > 0
                 and 0 <= self.samoe_top_m <= self.samoe_pool_size,
                 f"SaMoE fields out of range: pool {self.samoe_pool_size}, temperature {self.samoe_temperature}, "
                 f"top_m {self.samoe_top_m}")
            need(self.samoe_combination in ("softmax", "linear"),
                 f"samoe_combination must be 'softmax' or 'linear', got {self.samoe_combination!r}")
            need(not self.samoe_route_to_pool or self.num_experts == self.samoe_pool_size,
                 f"samoe_route_to_pool needs num_experts {self.num_experts} == samoe_pool_size {self.samoe_pool_size}")

    @property
    def kind(self) -> str:
        """'dense', 'moe' or 'samoe'."""
        if not self.moe_layers:
            return "dense"
        return "samoe" if self.samoe_pool_size is not None else "moe"

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @classmethod
    def from_dict(cls, d: dict) -> "PlainGPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(_METADATA_KEYS))
        if unknown:
            raise ValueError(f"PlainGPTConfig: unknown fields {unknown} (a model.json from another tool or version?)")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "kind": self.kind, **dataclasses.asdict(self)}


def paths(path) -> tuple[Path, Path]:
    """(weights, config) of a plain model: ``X.safetensors`` + ``X.json``, or ``DIR/model.*``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / "model.safetensors", path / "model.json"


# -- layers ---------------------------------------------------------------------------------------
def _norm(cfg: PlainGPTConfig) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BNSD: torch.Tensor, freqs_SR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head by the angles freqs_SR [S, R]; the rest pass through."""
    rot = freqs_SR.shape[-1]
    x_rot, x_pass = x_BNSD[..., :rot], x_BNSD[..., rot:]
    x_rot = x_rot * freqs_SR.cos().to(x_rot.dtype) + _rotate_half(x_rot) * freqs_SR.sin().to(x_rot.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: PlainGPTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // self.num_heads
        self.qkv = nn.Linear(h, 3 * h, bias=False)  # rows [q heads; k heads; v heads]
        self.proj = nn.Linear(h, h, bias=False)

    def forward(self, x_BSH: torch.Tensor, freqs_SR: Optional[torch.Tensor]) -> torch.Tensor:
        B, S, H = x_BSH.shape
        q, k, v = (t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, hd]
                   for t in self.qkv(x_BSH).split(H, dim=-1))
        if freqs_SR is not None:
            q, k = apply_rope(q, freqs_SR), apply_rope(k, freqs_SR)
        scores_BNSS = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        causal_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSH.device).triu(1)
        probs_BNSS = torch.softmax(scores_BNSS.masked_fill(causal_SS, float("-inf")), dim=-1)
        out_BSH = (probs_BNSS @ v).transpose(1, 2).reshape(B, S, H)
        return self.proj(out_BSH)


def _ffn(x_TH, w1_FH, w2_HF, w3_FH, gate_T1=None) -> torch.Tensor:
    """One FFN in nn.Linear layout (w1 the activation input, w3 the SwiGLU 'up' half)."""
    if w3_FH is None:
        a_TF = F.gelu(F.linear(x_TH, w1_FH))
    else:
        a_TF = F.silu(F.linear(x_TH, w1_FH)) * F.linear(x_TH, w3_FH)
    if gate_T1 is not None:
        a_TF = a_TF * gate_T1  # megatron scales the fc2 input by the routing gate
    return F.linear(a_TF, w2_HF)


class MLP(nn.Module):
    """Dense FFN; also one standard expert. fc1 is [f, h], or [2f, h] = [gate; up] for SwiGLU."""

    def __init__(self, h: int, f: int, gated: bool):
        super().__init__()
        self.f, self.gated = f, gated
        self.fc1 = nn.Linear(h, 2 * f if gated else f, bias=False)
        self.fc2 = nn.Linear(f, h, bias=False)

    def weights(self) -> tuple:
        """(w1 [f, h], w2 [h, f], w3 [f, h] or None)."""
        w = self.fc1.weight
        return (w[: self.f], self.fc2.weight, w[self.f:]) if self.gated else (w, self.fc2.weight, None)

    def forward(self, x_TH: torch.Tensor, gate_T1: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _ffn(x_TH, *self.weights(), gate_T1)


class Pool(nn.Module):
    """SaMoE's shared expert pool: w1 [P, h, f], w2 [P, f, h] (+ w3 [P, h, f] gated)."""

    def __init__(self, P: int, h: int, f: int, gated: bool):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(P, h, f))
        self.w2 = nn.Parameter(torch.zeros(P, f, h))
        self.w3 = nn.Parameter(torch.zeros(P, h, f)) if gated else None


def combination_weights(logits_NP: torch.Tensor, temperature: float, top_m: int, mode: str = "softmax") -> torch.Tensor:
    """A_NP = softmax(C / tau) per row; with 0 < top_m < P only the top-m logits, renormalised;
    ``mode='linear'``: A = C."""
    if mode == "linear":
        return logits_NP.float()
    scaled_NP = logits_NP.float() / temperature
    if not 0 < top_m < scaled_NP.shape[-1]:
        return torch.softmax(scaled_NP, dim=-1)
    keep_NM = scaled_NP.topk(top_m, dim=-1).indices
    return torch.zeros_like(scaled_NP).scatter(-1, keep_NM, torch.softmax(scaled_NP.gather(-1, keep_NM), dim=-1))


class MoE(nn.Module):
    """Dropless top-k MoE layer; standard experts, or SaMoE experts built from the pool."""

    def __init__(self, cfg: PlainGPTConfig):
        super().__init__()
        h, N, f = cfg.hidden_size, cfg.num_experts, cfg.moe_ffn_hidden_size
        self.cfg = cfg
        self.router = nn.Linear(h, N, bias=False)
        if cfg.samoe_pool_size is None:
            self.experts = nn.ModuleList(MLP(h, f, cfg.gated) for _ in range(N))
        elif not cfg.samoe_route_to_pool:
            self.combination_logits = nn.Parameter(torch.zeros(N, cfg.samoe_pool_size))  # C_NP

    def expert_weights(self, pool: Optional[Pool]) -> list:
        """[(w1 [f, h], w2 [h, f], w3 [f, h] or None)] of the N experts of this layer."""
        if pool is None:
            return [e.weights() for e in self.experts]
        c = self.cfg
        if c.samoe_route_to_pool:  # shared routing: the pool's experts as they are
            return [(pool.w1[e].t(), pool.w2[e].t(), None if pool.w3 is None else pool.w3[e].t())
                    for e in range(c.num_experts)]
        A_NP = combination_weights(self.combination_logits, c.samoe_temperature, c.samoe_top_m,
                                   c.samoe_combination).to(pool.w1.dtype)
        P = A_NP.shape[1]
        # W_l = A_l @ pool: one GEMM on the flattened pool per weight
        w1_NHF, w2_NFH, w3_NHF = (None if w is None else (A_NP @ w.reshape(P, -1)).view(-1, *w.shape[1:])
                                  for w in (pool.w1, pool.w2, pool.w3))
        return [(w1_NHF[e].t(), w2_NFH[e].t(), None if w3_NHF is None else w3_NHF[e].t())
                for e in range(A_NP.shape[0])]

    def forward(self, x_TH: torch.Tensor, pool: Optional[Pool]) -> torch.Tensor:
        c = self.cfg
        logits_TN = self.router(x_TH)
        if c.moe_router_pre_softmax:
            gates_TK, chosen_TK = torch.softmax(logits_TN, dim=-1, dtype=torch.float32).topk(c.moe_router_topk, dim=-1)
        else:
            top_TK, chosen_TK = logits_TN.topk(c.moe_router_topk, dim=-1)
            gates_TK = torch.softmax(top_TK, dim=-1, dtype=torch.float32)
        gates_TK = gates_TK.to(x_TH.dtype)
        y_TH = torch.zeros_like(x_TH)
        for e, weights in enumerate(self.expert_weights(pool)):
            tok_t, slot_t = (chosen_TK == e).nonzero(as_tuple=True)  # tokens routed to expert e
            if tok_t.numel():
                y_TH.index_add_(0, tok_t, _ffn(x_TH[tok_t], *weights, gates_TK[tok_t, slot_t, None]))
        return y_TH


class Block(nn.Module):
    def __init__(self, cfg: PlainGPTConfig, moe: bool):
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.gated)

    def forward(self, x_BSH, freqs_SR, pool):
        x_BSH = x_BSH + self.attn(self.attn_norm(x_BSH), freqs_SR)
        h_BSH = self.mlp_norm(x_BSH)
        if isinstance(self.mlp, MoE):
            return x_BSH + self.mlp(h_BSH.reshape(-1, h_BSH.shape[-1]), pool).view_as(h_BSH)
        return x_BSH + self.mlp(h_BSH)


# -- the model ------------------------------------------------------------------------------------
class PlainGPT(nn.Module):
    """``logits(tokens [b, s]) -> [b, s, V]``; ``generate``; ``from_pretrained``/``save_pretrained``."""

    def __init__(self, cfg: PlainGPTConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        if cfg.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, h)
        else:
            rot = int(h // cfg.num_attention_heads * cfg.rotary_percent)
            inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList(Block(cfg, i in cfg.moe_layers) for i in range(cfg.num_layers))
        self.final_norm = _norm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        if cfg.samoe_pool_size is not None:
            self.pool = Pool(cfg.samoe_pool_size, h, cfg.moe_ffn_hidden_size, cfg.gated)

    def logits(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        B, S = tokens_BS.shape
        if S > self.config.max_position_embeddings:
            raise ValueError(f"{S} tokens exceed max_position_embeddings {self.config.max_position_embeddings}")
        x_BSH = self.embed_tokens(tokens_BS)
        freqs_SR = None
        if self.config.position_embedding_type == "learned_absolute":
            x_BSH = x_BSH + self.embed_positions(torch.arange(S, device=tokens_BS.device))
        else:
            angles = torch.outer(torch.arange(S, device=tokens_BS.device, dtype=torch.float32), self.inv_freq)
            freqs_SR = torch.cat((angles, angles), dim=-1)  # [S, rot]: the same angle for both halves
        pool = getattr(self, "pool", None)
        for block in self.layers:
            x_BSH = block(x_BSH, freqs_SR, pool)
        x_BSH = self.final_norm(x_BSH)
        out_weight = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(x_BSH, out_weight)  # [B, S, V]

    forward = logits

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: Optional[int] = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``tokens`` [b, s]; returns [b, s + new].

        ``temperature`` 0 is greedy (argmax); ``top_k`` samples among the k most likely tokens;
        ``seed`` makes sampling reproducible (a private generator, torch's RNG is untouched). The
        context is cropped to the last ``max_position_embeddings`` tokens.
        """
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=tokens.device).manual_seed(seed)
        for _ in range(max_new_tokens):
            context = tokens[:, -self.config.max_position_embeddings:]
            logits_BV = self.logits(context)[:, -1, :].float()
            if temperature == 0:
                nxt = logits_BV.argmax(dim=-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k is not None:
                    kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits_BV, dim=-1), 1, generator=generator)
            tokens = torch.cat((tokens, nxt.to(tokens.dtype)), dim=1)
        return tokens

    # -- files --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device="cpu") -> "PlainGPT":
        """Load ``X.safetensors`` + ``X.json`` (or ``DIR/model.*``) as written by export/save_pretrained."""
        from safetensors.torch import load_file

        weights, config = paths(path)
        for p in (weights, config):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing: write it with tools/convert_checkpoint.py export")
        with open(config) as f:
            cfg = PlainGPTConfig.from_dict(json.load(f))
        model = cls(cfg)
        state = load_file(str(weights))
        want = model.state_dict()
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        bad = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
        if missing or extra or bad:
            raise ValueError(f"{weights} does not match {config}: missing {missing[:3]}, unexpected {extra[:3]}, "
                             f"wrong shape {bad[:3]}")
        model.load_state_dict(state)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path) -> tuple[Path, Path]:
        """Write ``X.safetensors`` + ``X.json`` (or ``DIR/model.*``); returns the two paths."""
        from safetensors.torch import save_file

        weights, config = paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(weights),
                  metadata={"format": FORMAT})
        with open(config, "w") as f:
            json.dump(self.config.to_dict(), f, indent=1)
        return weights, config
