"""ollama-ft: fine-tune a base model, export it to GGUF, and run it in Ollama.

The library is usable from Python without the CLI, e.g.::

    from ollama_ft.recipe import load_recipe
    from ollama_ft.pipeline import build
    result = build(load_recipe("recipes/tiny-demo.toml"))

Heavy modules (torch, transformers, unsloth) are imported inside the stage that uses them,
so importing this package or the CLI stays instant.
"""

__version__ = "0.1.0"
