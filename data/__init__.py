"""This folder ships inside the wheel as the package ollama_ft.resources.data (see ollama_ft/resources)."""
