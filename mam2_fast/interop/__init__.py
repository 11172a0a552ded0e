"""Converters between this project's weights and other ecosystems (official VideoMAE,
HuggingFace ``transformers``)."""
