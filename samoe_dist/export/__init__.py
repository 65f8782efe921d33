"""Checkpoint conversion and a plain PyTorch model of what samoe_dist trains.

- :mod:`.plain_gpt`  PlainGPT / PlainGPTConfig: torch only (no megatron-core, DeepSpeed or process
                     groups); logits equal the training model's; ``generate``; safetensors files
- :mod:`.names`      the weights of a config: canonical checkpoint name <-> plain name, shapes
- :mod:`.convert`    reshard (weights-only, any layout), export, import; used by
                     ``tools/convert_checkpoint.py``
- :mod:`.evaluate`   the language-model loss of a plain model on token batches
- :mod:`.hf`         Hugging Face folders: export (samoe's own code, or Mixtral), import of a Mixtral
- :mod:`.compress`   a standard MoE's experts as a SaMoE pool and combination logits

Importing this package loads only the plain model (torch).
"""

from samoe_dist.export.plain_gpt import PlainGPT, PlainGPTConfig

__all__ = ["PlainGPT", "PlainGPTConfig"]
