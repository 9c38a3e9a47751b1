"""kiln: an LLM engine, 3D sparse convolution, INT8 quantization and PPO on one PyTorch kernel layer."""

__version__ = "0.1.0"
