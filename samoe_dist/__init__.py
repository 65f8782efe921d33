"""samoe_dist: distributed pretraining of shared-pool Mixture-of-Experts (SaMoE) GPT models
with megatron-core and DeepSpeed."""

__version__ = "0.1.0"
