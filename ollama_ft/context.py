"""What every stage of one build reads: the recipe, the run folder, the base, the template, the data.

`prepare()` works it out once, after preflight, and freezes it, so a stage cannot change what a
later stage sees, and a newcomer finds every input of the pipeline in one dataclass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ollama_ft.errors import UserInputError
from ollama_ft.recipe import Recipe
from ollama_ft.runs import RunDir, fingerprint
from ollama_ft.template_match import ChatTemplate, check_examples_render, choose_template, render


@dataclass(frozen=True)
class BuildContext:
    recipe: Recipe
    options: Any                 # pipeline.BuildOptions
    run: RunDir
    host: str
    name: str                    # the Ollama model name this build registers
    base: Any                    # base_model.ResolvedBase
    template: ChatTemplate       # what training renders, and what the TEMPLATE must render the same
    data: Any                    # data.LoadedData
    launcher: Any                # train.Launcher
    examples: list[dict]         # training records without their source positions
    validation: list[dict]
    data_fp: str
    samples: list[str]           # rendered examples for the merge and convert logit checks

    @property
    def assistant_only_loss(self) -> bool:
        chosen = self.recipe.train.assistant_only_loss
        return self.data.format != "text" if chosen is None else chosen

    @property
    def sources(self) -> list[str]:
        """Where each training record came from (file:line), for error messages."""
        return [e.source for e in self.data.train]

    def log(self, line: str) -> None:
        """One plain line in build.log, for people and for grep."""
        import time

        self.run.root.mkdir(parents=True, exist_ok=True)
        with open(self.run.path("build.log"), "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    def warn(self, stage: str, message: str) -> None:
        self.options.reporter.stage(stage, "warn", message)
        self.log(f"{stage} warning: {message}")


def prepare(recipe: Recipe, options, run: RunDir, host: str, name: str, ready) -> BuildContext:
    """Resolve the base, choose the template, check every example renders with it."""
    from ollama_ft.base_model import resolve_base

    base = resolve_base(recipe, Path(options.runs_root), host)
    tokenizer_config = base_tokenizer_config(base.path) if recipe.model.chat_template == "auto" else {}
    template = choose_template(recipe.model.chat_template, tokenizer_config.get("chat_template"), recipe.model.base,
                               special_token(tokenizer_config, "eos_token"))
    examples = [_without_source(e) for e in ready.data.train]
    check_examples_render(template, examples, [e.source for e in ready.data.train])
    validation = [_without_source(e) for e in ready.data.validation]
    return BuildContext(recipe, options, run, host, name, base, template, ready.data, ready.launcher, examples,
                        validation, fingerprint(examples, validation), sample_texts(examples, template))


def _without_source(example) -> dict:
    record = asdict(example)
    record.pop("source", None)
    return record


def base_tokenizer_config(base_path: str) -> dict[str, Any]:
    """The base's tokenizer_config.json with its chat template (read from files; no transformers)."""
    folder = Path(base_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(base_path, "tokenizer_config.json")).parent
        except Exception:
            raise UserInputError(f"model.base = {base_path!r}: cannot read its tokenizer to find its chat template",
                                 "set model.chat_template to a family such as chatml") from None
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        config["chat_template"] = jinja_file.read_text(encoding="utf-8")
    if not isinstance(config.get("chat_template"), str):
        config["chat_template"] = None
    return config


def special_token(config: dict[str, Any], name: str) -> str:
    value = config.get(name)
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def sample_texts(examples: list[dict], template: ChatTemplate, count: int = 3) -> list[str]:
    texts = []
    for example in examples[:count]:
        if example.get("messages"):
            texts.append(render(template.jinja, example["messages"], add_generation_prompt=False))
        elif example.get("text"):
            texts.append(example["text"])
    return texts


def quality_texts(examples: list[dict], validation: list[dict], template: ChatTemplate) -> tuple[list[str], str]:
    """(calibration, held-out): the examples rendered as training saw them, for the importance
    matrix; and plain text the matrix never saw, to measure each quantization on. The validation
    split is held out when there is one, else the last tenth of the examples."""
    def rendered(example: dict) -> str:
        if example.get("messages"):
            return render(template.jinja, example["messages"], add_generation_prompt=False)
        return example.get("text", "")

    def plain(example: dict) -> str:
        if example.get("messages"):
            return "\n".join(m["content"] for m in example["messages"])
        return example.get("text", "")

    held = validation or examples[len(examples) - max(1, len(examples) // 10):]
    calibrate = examples if validation else examples[:len(examples) - len(held)]
    return [rendered(e) for e in calibrate or examples], "\n\n".join(plain(e) for e in held)
