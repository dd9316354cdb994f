"""The device side of split fine-tuning. Never imports torch or transformers."""
