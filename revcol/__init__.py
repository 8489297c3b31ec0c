"""RevCol model family (placeholder until the model lands)."""
