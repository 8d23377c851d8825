"""Distributed LLM pretraining: megatron-core models under DeepSpeed ZeRO, fed by resumable WebDataset shards.

Start reading at ``pretrain/train.py``; the command line is ``pretrain/cli.py``.
"""

__version__ = "0.1.0"
