"""Built-in techniques: data/input_compression."""
