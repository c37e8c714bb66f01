"""Measurements of ollama-ft's stages; `python -m benchmarks.run` runs them (see README there)."""
