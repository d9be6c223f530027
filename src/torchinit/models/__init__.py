"""Models that ship with torchinit for its demo, benchmarks and tests."""

from torchinit.models.llama import Llama, LlamaConfig, config_for, num_parameters

__all__ = ["Llama", "LlamaConfig", "config_for", "num_parameters"]
