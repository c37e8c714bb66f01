"""This folder ships inside the wheel as the package ollama_ft.resources.modelfiles (see ollama_ft/resources)."""
