"""The Hugging Face config of a samoe GPT (dense, standard MoE, SaMoE or shared routing).

Copied as it is into every folder ``tools/convert_checkpoint.py export-hf`` writes, next to
``modeling_samoe.py``; it needs only transformers. The fields are those of samoe's plain model
(``samoe_dist/export/plain_gpt.py``, ``PlainGPTConfig``), with Hugging Face's usual names for the
common ones (``num_hidden_layers``, ``initializer_range``, the special token ids).
"""

from transformers import PretrainedConfig


class SamoeConfig(PretrainedConfig):
    model_type = "samoe_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=2000, num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                 ffn_hidden_size=512, max_position_embeddings=128, position_embedding_type="rope",
                 rotary_base=10000.0, rotary_percent=1.0, normalization="LayerNorm", norm_epsilon=1e-5,
                 activation="gelu", tie_word_embeddings=True, moe_layers=None, num_experts=None,
                 moe_ffn_hidden_size=None, moe_router_topk=2, moe_router_pre_softmax=True, samoe_pool_size=None,
                 samoe_temperature=1.0, samoe_top_m=0, samoe_combination="softmax", samoe_route_to_pool=False,
                 initializer_range=0.02, use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type  # 'rope' or 'learned_absolute'
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.normalization = normalization  # 'LayerNorm' or 'RMSNorm'
        self.norm_epsilon = norm_epsilon
        self.activation = activation  # 'gelu' or 'swiglu'
        self.moe_layers = list(moe_layers or [])  # 0-based indices of the MoE layers
        self.num_experts = num_experts
        self.moe_ffn_hidden_size = moe_ffn_hidden_size if moe_ffn_hidden_size is not None else ffn_hidden_size
        self.moe_router_topk = moe_router_topk
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.samoe_pool_size = samoe_pool_size  # P: the MoE layers combine one shared pool when set
        self.samoe_temperature = samoe_temperature
        self.samoe_top_m = samoe_top_m
        self.samoe_combination = samoe_combination  # 'softmax': A = softmax(C / tau); 'linear': A = C
        self.samoe_route_to_pool = samoe_route_to_pool
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
