"""The BindWeave LoRA trainer: ``python -m training.train_lora --config CONFIG.yaml``.

Reuses :mod:`bindweave_core` (encoders, DiT, conditioning, LoRA files), so what is trained is what
the nodes run. Modules: ``config`` (the YAML), ``dataset`` (samples, validation, frames, buckets),
``augment`` (reference rotation/scale), ``cache`` (encoder features on disk), ``objective``
(rectified flow loss), ``model`` (DiT + peft LoRA), ``checkpointing`` (exact resume),
``train_lora`` (the loop and CLI), ``make_example_dataset`` (a synthetic dataset).
"""
