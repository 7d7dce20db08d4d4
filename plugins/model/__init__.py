"""Built-in techniques: model."""
