"""Shard streaming for training and evaluation: see loader.py for the contract the trainer relies on."""

from pipeline.data.loader import DataConfig, ShardLoader

__all__ = ["DataConfig", "ShardLoader"]
