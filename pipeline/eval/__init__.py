"""Evaluation pieces behind the entry points ``pipeline.evaluate``, ``pipeline.analysis``, ``pipeline.finetune``
and ``pipeline.export``: frozen encoders, feature probes, attention statistics, fine-tuning helpers."""
