"""This folder ships inside the wheel as the package ollama_ft.resources.evals (see ollama_ft/resources)."""
