"""The conditioning models, one protocol (``base.Encoder``): Qwen2.5-VL planner, UMT5 text encoder, CLIP vision, Wan VAE."""
