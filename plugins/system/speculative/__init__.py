"""Built-in techniques: system/speculative."""
