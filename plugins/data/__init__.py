"""Built-in techniques: data."""
