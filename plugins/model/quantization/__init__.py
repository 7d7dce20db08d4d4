"""Built-in techniques: model/quantization."""
