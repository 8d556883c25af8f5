"""qwen3-stream's streaming ASR engine: pure PyTorch, no Ray, no Redis."""
