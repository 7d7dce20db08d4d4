"""Built-in techniques: system."""
