"""Evaluation pieces behind the entry points ``pipeline.evaluate``, ``pipeline.analysis`` and ``pipeline.export``:
frozen encoders, feature probes, attention statistics."""
