"""OFFSIDE: a benchmark and experiment service for unlearning misinformation in multimodal LLMs."""

__version__ = "0.1.0"
