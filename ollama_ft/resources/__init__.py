"""The files ollama-ft reads at run time: chat templates, the bundled eval suite and demo data.

They live at the top of the repository (`modelfiles/`, `evals/`, `data/`), where recipes and docs
point at them, and pyproject.toml's `package-dir` maps each folder into this package
(`ollama_ft.resources.modelfiles`, ...): a wheel carries them inside `ollama_ft/resources/`, and an
editable install reads the checkout's own files. Read them through `bundled`, never through a
path relative to the source file.

    from ollama_ft.resources import bundled
    bundled("evals", "turkish-core.toml")      # a pathlib.Path to the installed file
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Literal

Kind = Literal["modelfiles", "evals", "data"]

# A checkout put on sys.path without installing it (the GPU machine's PYTHONPATH=$PWD): the mapped
# folders are found at the repository root, the same files an editable install reads.
_CHECKOUT = Path(__file__).resolve().parent.parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "modelfiles" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 - a package's own __path__


def bundled(kind: Kind, name: str) -> Path:
    """The installed file `name` of the bundled `kind` folder."""
    # pip installs wheels unpacked, so the resource is a real file; the os.fspath makes a zipped
    # install fail here, loudly, rather than later with a path that does not exist.
    return Path(os.fspath(files(f"ollama_ft.resources.{kind}") / name))
