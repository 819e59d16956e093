"""FlashRecovery: fast, checkpoint-free failure recovery for large-scale training."""

__version__ = "0.1.0"
