"""Hugging Face folders of samoe models (``tools/convert_checkpoint.py export-hf`` / ``import-hf``).

- :mod:`.configuration_samoe`, :mod:`.modeling_samoe`: the config and causal-LM classes copied into
  every exported folder (torch + transformers only; loaded with ``trust_remote_code=True``)
- :mod:`.convert`: export (samoe's own format, or transformers' Mixtral), import of a Mixtral, the
  tokenizer conversion

Importing this package imports nothing from transformers; the conversions import it when they run.
"""
