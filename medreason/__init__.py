"""medreason: fine-tune LLMs on MedReason clinical reasoning with LoRA / QLoRA."""

__version__ = "0.1.0"
