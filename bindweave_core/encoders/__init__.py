"""The conditioning models: Qwen2.5-VL planner, UMT5 text encoder, CLIP vision, Wan VAE."""
