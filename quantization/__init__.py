"""Quantization: QAT fine-tuning, full-integer conversion and the model bundle the daemon ships."""
