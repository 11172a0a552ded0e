"""Downstream use of pre-trained encoders: fine-tuning, multi-view evaluation, linear probing,
export and visualization helpers (CLIs: ``mam2_fast.finetune``, ``.evaluate``, ``.probe``,
``.export``, ``.visualize``)."""
