"""A samoe GPT as a Hugging Face causal LM: ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

Copied as it is, with ``configuration_samoe.py``, into every folder ``tools/convert_checkpoint.py
export-hf`` writes; it needs only torch and transformers. The math is samoe's plain model
(``samoe_dist/export/plain_gpt.py``; megatron-core's GPTModel as the trainer builds it), so the
logits equal the training model's to fp32 rounding; this file adds what Hugging Face's ``generate``
and batched evaluation need: a key/value cache, an attention mask (padding) and position ids.

- pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, a final norm, an output layer
  tied to the token embedding unless untied; LayerNorm (with bias) or RMSNorm.
- attention: fused qkv with rows ``[q heads; k heads; v heads]``, causal, RoPE on the first
  ``rotary_percent`` of each head's dims (non-interleaved halves) or learned absolute positions.
- MLP: ``gelu(x W1^T) W2^T`` (erf gelu), or SwiGLU with fc1 rows ``[gate; up]``.
- MoE layers, dropless top-k: pre-softmax gates (top-k of the softmax over all N experts) or a
  softmax over the top-k logits. SaMoE layers build their N experts from the model's one expert
  pool, ``W_l = A_l @ pool`` with ``A_l = softmax(C_l / tau)`` (top-m entries of a row when
  ``0 < m < P``) or ``A_l = C_l`` (linear); the pool and the combination logits ``C_l`` are
  parameters as trained (nothing is materialised in the file). With shared routing the N = P
  experts of a layer are the pool's.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers' initialisers skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # older transformers
    from torch.nn import init

from .configuration_samoe import SamoeConfig

# transformers renamed the output's and the forward's cache argument ('past_key_values' -> 'cache')
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _norm(config) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BNSD: torch.Tensor, freqs_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head by the angles freqs_BSR [B, S, R]; the rest pass through."""
    rot = freqs_BSR.shape[-1]
    freqs = freqs_BSR[:, None]  # [B, 1, S, R]
    x_rot, x_pass = x_BNSD[..., :rot], x_BNSD[..., rot:]
    x_rot = x_rot * freqs.cos().to(x_rot.dtype) + _rotate_half(x_rot) * freqs.sin().to(x_rot.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


class SamoeAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.qkv = nn.Linear(h, 3 * h, bias=False)  # rows [q heads; k heads; v heads]
        self.proj = nn.Linear(h, h, bias=False)

    def forward(self, x_BSH, freqs_BSR, allowed_BSK, cache):
        B, S, H = x_BSH.shape
        q, k, v = (t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, hd]
                   for t in self.qkv(x_BSH).split(H, dim=-1))
        if freqs_BSR is not None:
            q, k = apply_rope(q, freqs_BSR), apply_rope(k, freqs_BSR)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, nh, K, hd]: the past and these S
        scores_BNSK = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        # the dtype's lowest value, not -inf: a padding query that may see no key stays finite
        scores_BNSK = scores_BNSK.masked_fill(~allowed_BSK[:, None], torch.finfo(scores_BNSK.dtype).min)
        probs_BNSK = torch.softmax(scores_BNSK, dim=-1)
        out_BSH = (probs_BNSK @ v).transpose(1, 2).reshape(B, S, H)
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


class SamoeMLP(nn.Module):
    """Dense FFN; also one standard expert. fc1 is [f, h], or [2f, h] = [gate; up] for SwiGLU."""

    def __init__(self, h: int, f: int, gated: bool):
        super().__init__()
        self.f, self.gated = f, gated
        self.fc1 = nn.Linear(h, 2 * f if gated else f, bias=False)
        self.fc2 = nn.Linear(f, h, bias=False)

    def weights(self) -> tuple:
        w = self.fc1.weight
        return (w[: self.f], self.fc2.weight, w[self.f:]) if self.gated else (w, self.fc2.weight, None)

    def forward(self, x, gate_T1=None):
        return _ffn(x, *self.weights(), gate_T1)


class SamoePool(nn.Module):
    """The model's shared expert pool: w1 [P, h, f], w2 [P, f, h] (+ w3 [P, h, f] gated)."""

    def __init__(self, P: int, h: int, f: int, gated: bool):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(P, h, f))
        self.w2 = nn.Parameter(torch.zeros(P, f, h))
        self.w3 = nn.Parameter(torch.zeros(P, h, f)) if gated else None


def combination_weights(logits_NP, temperature: float, top_m: int, mode: str = "softmax") -> torch.Tensor:
    """A_NP = softmax(C / tau) per row (only the top-m logits, renormalised, when 0 < m < P); linear: A = C."""
    if mode == "linear":
        return logits_NP.float()
    scaled_NP = logits_NP.float() / temperature
    if not 0 < top_m < scaled_NP.shape[-1]:
        return torch.softmax(scaled_NP, dim=-1)
    keep_NM = scaled_NP.topk(top_m, dim=-1).indices
    return torch.zeros_like(scaled_NP).scatter(-1, keep_NM, torch.softmax(scaled_NP.gather(-1, keep_NM), dim=-1))


class SamoeMoE(nn.Module):
    """Dropless top-k MoE layer; standard experts, or SaMoE experts built from the pool."""

    def __init__(self, config):
        super().__init__()
        h, N, f = config.hidden_size, config.num_experts, config.moe_ffn_hidden_size
        self.config = config
        self.router = nn.Linear(h, N, bias=False)
        if config.samoe_pool_size is None:
            self.experts = nn.ModuleList(SamoeMLP(h, f, config.activation == "swiglu") for _ in range(N))
        elif not config.samoe_route_to_pool:
            self.combination_logits = nn.Parameter(torch.zeros(N, config.samoe_pool_size))  # C_NP

    def expert_weights(self, pool) -> list:
        """[(w1 [f, h], w2 [h, f], w3 [f, h] or None)] of the N experts of this layer."""
        if pool is None:
            return [e.weights() for e in self.experts]
        c = self.config
        if c.samoe_route_to_pool:
            return [(pool.w1[e].t(), pool.w2[e].t(), None if pool.w3 is None else pool.w3[e].t())
                    for e in range(c.num_experts)]
        A_NP = combination_weights(self.combination_logits, c.samoe_temperature, c.samoe_top_m,
                                   c.samoe_combination).to(pool.w1.dtype)
        P = A_NP.shape[1]
        w1_NHF, w2_NFH, w3_NHF = (None if w is None else (A_NP @ w.reshape(P, -1)).view(-1, *w.shape[1:])
                                  for w in (pool.w1, pool.w2, pool.w3))
        return [(w1_NHF[e].t(), w2_NFH[e].t(), None if w3_NHF is None else w3_NHF[e].t())
                for e in range(A_NP.shape[0])]

    def forward(self, x_TH, pool):
        c = self.config
        logits_TN = self.router(x_TH)
        if c.moe_router_pre_softmax:
            gates_TK, chosen_TK = torch.softmax(logits_TN, dim=-1, dtype=torch.float32).topk(c.moe_router_topk, dim=-1)
        else:
            top_TK, chosen_TK = logits_TN.topk(c.moe_router_topk, dim=-1)
            gates_TK = torch.softmax(top_TK, dim=-1, dtype=torch.float32)
        gates_TK = gates_TK.to(x_TH.dtype)
        y_TH = torch.zeros_like(x_TH)
        for e, weights in enumerate(self.expert_weights(pool)):
            tok_t, slot_t = (chosen_TK == e).nonzero(as_tuple=True)
            if tok_t.numel():
                y_TH.index_add_(0, tok_t, _ffn(x_TH[tok_t], *weights, gates_TK[tok_t, slot_t, None]))
        return y_TH


class SamoeBlock(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = SamoeAttention(config, layer_idx)
        self.mlp_norm = _norm(config)
        if layer_idx in config.moe_layers:
            self.mlp = SamoeMoE(config)
        else:
            self.mlp = SamoeMLP(config.hidden_size, config.ffn_hidden_size, config.activation == "swiglu")

    def forward(self, x_BSH, freqs_BSR, allowed_BSK, cache, pool):
        x_BSH = x_BSH + self.attn(self.attn_norm(x_BSH), freqs_BSR, allowed_BSK, cache)
        h_BSH = self.mlp_norm(x_BSH)
        if isinstance(self.mlp, SamoeMoE):
            return x_BSH + self.mlp(h_BSH.reshape(-1, h_BSH.shape[-1]), pool).view_as(h_BSH)
        return x_BSH + self.mlp(h_BSH)


class SamoePreTrainedModel(PreTrainedModel):
    config_class = SamoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SamoeBlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SamoePool):
            for w in (module.w1, module.w2, module.w3):
                if w is not None:
                    init.normal_(w, mean=0.0, std=std)
        elif isinstance(module, SamoeMoE) and hasattr(module, "combination_logits"):
            init.normal_(module.combination_logits, mean=0.0, std=1.0)


class SamoeModel(SamoePreTrainedModel):
    """The transformer without its output layer: hidden states after the final norm."""

    def __init__(self, config: SamoeConfig):
        super().__init__(config)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, h)
        self.layers = nn.ModuleList(SamoeBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = _norm(config)
        if config.samoe_pool_size is not None:
            self.pool = SamoePool(config.samoe_pool_size, h, config.moe_ffn_hidden_size,
                                  config.activation == "swiglu")
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rope_freqs(self, position_ids_BS: torch.Tensor) -> torch.Tensor:
        c = self.config
        rot = int(c.hidden_size // c.num_attention_heads * c.rotary_percent)
        inv_freq = 1.0 / (c.rotary_base ** (torch.arange(0, rot, 2, dtype=torch.float32,
                                                         device=position_ids_BS.device) / rot))
        angles = position_ids_BS[..., None].float() * inv_freq  # [B, S, rot/2]
        return torch.cat((angles, angles), dim=-1)  # the same angle for both halves

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x_BSH = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = x_BSH.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if self.config.position_embedding_type == "learned_absolute" and past + S > self.config.max_position_embeddings:
                raise ValueError(f"{past + S} positions (past {past} + new {S}) exceed max_position_embeddings "
                                 f"{self.config.max_position_embeddings} of this model's learned position embeddings: "
                                 f"give at most the last {self.config.max_position_embeddings} tokens")
            position_ids = (torch.arange(S, device=x_BSH.device) + past).expand(B, S)
        freqs_BSR = None
        if self.config.position_embedding_type == "learned_absolute":
            x_BSH = x_BSH + self.embed_positions(position_ids)
        else:
            freqs_BSR = self._rope_freqs(position_ids)
        # query i (cache index past + i) sees key j when j <= past + i and key j is not padding
        K = past + S
        allowed_BSK = (torch.arange(K, device=x_BSH.device)[None, :]
                       <= torch.arange(past, K, device=x_BSH.device)[:, None]).expand(B, S, K)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != K:
                raise ValueError(f"attention_mask must be [batch, {K}] (past and new tokens), got "
                                 f"{tuple(attention_mask.shape)}")
            allowed_BSK = allowed_BSK & attention_mask.bool()[:, None, :]
        pool = getattr(self, "pool", None)
        for block in self.layers:
            x_BSH = block(x_BSH, freqs_BSR, allowed_BSK, cache, pool)
        return self.final_norm(x_BSH)


class SamoeForCausalLM(SamoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SamoeConfig):
        super().__init__(config)
        self.model = SamoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            from transformers import DynamicCache

            cache = DynamicCache()
        hidden_BSH = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None, inputs_embeds)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_BSH = hidden_BSH[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_BSH = hidden_BSH[:, logits_to_keep]
        logits_BSV = self.lm_head(hidden_BSH)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits_BSV, **{_CACHE_FIELD: cache if use_cache else None})
