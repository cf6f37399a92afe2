"""cl-release: keep a LoRA-tuned domain LLM current, one safe release at a time."""

__version__ = "0.1.0"
