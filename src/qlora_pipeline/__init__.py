"""qlora-pipeline: QLoRA vs LoRA fine-tuning, evaluation and quality-gap reporting."""

__version__ = "0.1.0"
