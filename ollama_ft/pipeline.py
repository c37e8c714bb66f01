"""The build pipeline: train → merge → convert → imatrix → quantize → modelfile → register → smoke → eval.

Each stage is a small module with a typed input and output; this file only decides what each
stage gets, skips stages whose inputs did not change (their record's fingerprint matches), and
keeps `metrics.json` up to date. A kill at any point costs only the unfinished stage.

    from ollama_ft.recipe import load_recipe
    from ollama_ft.pipeline import BuildOptions, build
    result = build(load_recipe("recipes/tiny-demo.toml"), BuildOptions(backend="peft"))
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ollama_ft.template_match import ChatTemplate, check_examples_render, choose_template, render
from ollama_ft.errors import OllamaFtError, UserInputError
from ollama_ft.recipe import Recipe
from ollama_ft.runs import RunDir, StageRecord, atomic_write_json, clean_partials, file_digest, file_stat, fingerprint, tree_size

STAGES = ("train", "merge", "convert", "imatrix", "quantize", "tokenizer", "modelfile", "register", "smoke", "baseline", "eval")


class Reporter(Protocol):
    def stage(self, name: str, status: str, detail: str = "") -> None: ...   # start | skip | done | warn
    def progress(self, name: str, done: int, total: int, detail: str = "") -> None: ...


class NullReporter:
    def stage(self, name: str, status: str, detail: str = "") -> None:
        pass

    def progress(self, name: str, done: int, total: int, detail: str = "") -> None:
        pass


@dataclass
class BuildOptions:
    backend: str = "peft"
    variant: str | None = None            # run folder / Ollama tag; default: the backend's name
    qlora: bool | None = None             # compare's "-qlora" variants force 4-bit loading
    tag_model: bool = False               # compare: register as NAME:variant
    force: bool = False                   # redo every stage; replace an Ollama model of the same name
    from_stage: str | None = None         # redo this stage and every later one
    runs_root: Path = Path("runs")
    host: str | None = None               # overrides recipe and $OLLAMA_HOST
    device: str = "auto"                  # "cpu" forces CPU training
    launcher: str = "python"              # "accelerate": train under `accelerate launch`
    num_processes: int = 1                # processes (GPUs) for the accelerate launcher
    accelerate_config: Path | None = None # an `accelerate config` file (FSDP, DeepSpeed, …)
    skip_eval: bool = False
    reporter: Reporter = field(default_factory=NullReporter)


@dataclass
class BuildResult:
    run_dir: Path
    model_name: str
    host: str
    ran: list[str]
    skipped: list[str]
    metrics: dict[str, Any]

    @property
    def gguf_path(self) -> Path:
        return Path(self.metrics["quantize"]["gguf_path"])


def variant_name(options: BuildOptions) -> str:
    return options.variant or options.backend


def ollama_model_name(recipe: Recipe, options: BuildOptions) -> str:
    name = recipe.ollama.name
    if options.tag_model:
        name = name.split(":", 1)[0] + ":" + variant_name(options)
    return name


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


def require_cuda(what: str, device: str) -> None:
    """bitsandbytes' 4-bit kernels need a CUDA GPU; say so before training instead of failing in it."""
    import importlib.util

    cuda = False
    if device != "cpu" and importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise UserInputError(f"{what} needs a CUDA GPU, and none is available here",
                             "set model.load_in_4bit = false and train.method = 'lora' to train on this machine")


def memory_estimate(recipe: Recipe, options: BuildOptions) -> dict[str, Any] | None:
    """`ollama-ft estimate` for what this build trains, on the device it trains on; None if unknown."""
    from ollama_ft.estimate import estimate_memory, training_device_bytes

    if options.qlora:
        method = "qlora" if recipe.train.method in ("lora", "dora") else recipe.train.method
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"load_in_4bit": True}),
                                           "train": recipe.train.model_copy(update={"method": method})})
    device_bytes, cpu = training_device_bytes(force_cpu=options.device == "cpu")
    try:
        est = estimate_memory(recipe, device_bytes=device_bytes, cpu=cpu, num_processes=options.num_processes)
    except OllamaFtError:
        return None   # a hub model whose config is not cached: nothing to estimate from
    return {"total_bytes": est.total_bytes, "breakdown": est.breakdown, "device_bytes": device_bytes,
            "device": "cpu" if cpu else "cuda", "fits": est.fits, "warning": est.warning,
            "host_bytes": est.host_bytes}


def export_ram_warning(recipe: Recipe, options: BuildOptions) -> str | None:
    """A warning when merge and the GGUF check need more RAM than is available now, else None.

    Not an error: swap, or an estimate on the high side, can still see the build through; but if
    the kernel kills it, the person has already read why."""
    from ollama_ft.estimate import available_ram_bytes

    need = (memory_estimate(recipe, options) or {}).get("host_bytes")
    available = available_ram_bytes()
    if not need or available is None or need <= available:
        return None
    return (f"merge and the GGUF check hold the model in RAM, about {need / 2**30:.1f} GiB, and "
            f"{available / 2**30:.1f} GiB is available: the build may be killed for memory; close other "
            "programs and rerun: the finished train stage is kept and skipped")


def require_tensorboard() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        from ollama_ft.errors import MissingDependencyError

        raise MissingDependencyError("train.report_to = 'tensorboard' needs the tensorboard package",
                                     "pip install 'ollama-ft[tensorboard]', or set train.report_to = 'none'")


def ensure_disk(folder: Path, need_bytes: int, stage: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need_bytes * 1.1 > free:
        raise OllamaFtError(f"{stage}: needs about {need_bytes / 2**30:.1f} GiB in {folder}, only "
                            f"{free / 2**30:.1f} GiB free", "free some disk or use --runs-dir on a larger disk")


class _Runner:
    """Runs stages in order, skipping those whose record's fingerprint matches."""

    def __init__(self, run: RunDir, options: BuildOptions):
        self.run, self.options = run, options
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.metrics: dict[str, Any] = {}

    def log(self, line: str) -> None:
        """One plain line per stage event in build.log, for people and for grep."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        with open(self.run.path("build.log"), "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    def stage(self, name: str, key: str, work: Callable[[], dict[str, Any]],
              still_valid: Callable[[dict], bool] = lambda outputs: True) -> dict[str, Any]:
        record = self.run.read_record(name)
        if record and record.fingerprint == key and still_valid(record.outputs):
            self.log(f"{name} skipped (fingerprint {key} unchanged)")
            self.skipped.append(name)
            self.options.reporter.stage(name, "skip")
            self.metrics[name] = {**record.outputs, "seconds": record.seconds, "skipped": True}
            return record.outputs
        self.run.drop_records([name])
        self.options.reporter.stage(name, "start")
        self.log(f"{name} started (fingerprint {key})")
        start = time.perf_counter()
        try:
            outputs = work()
        except BaseException as exc:
            self.log(f"{name} failed after {time.perf_counter() - start:.1f}s: {type(exc).__name__}: {exc}")
            raise
        seconds = time.perf_counter() - start
        self.log(f"{name} done in {seconds:.1f}s")
        self.run.write_record(StageRecord(stage=name, fingerprint=key, outputs=outputs, seconds=seconds))
        self.ran.append(name)
        self.metrics[name] = {**outputs, "seconds": seconds, "skipped": False}
        self.options.reporter.stage(name, "done", f"{seconds:.1f}s")
        self.write_metrics()
        return outputs

    def write_metrics(self) -> None:
        atomic_write_json(self.run.path("metrics.json"), self.metrics)


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


def training_launcher(options: BuildOptions):
    """The train stage's Launcher, after checking the launcher options fit together."""
    from ollama_ft.train import Launcher

    if options.launcher not in ("python", "accelerate"):
        raise UserInputError(f"--launcher {options.launcher!r} is not a launcher", "choose one of: python, accelerate")
    if options.num_processes < 1:
        raise UserInputError(f"--num-processes {options.num_processes} must be at least 1", "use --num-processes 2 for two GPUs")
    if options.launcher == "python" and (options.num_processes > 1 or options.accelerate_config):
        raise UserInputError("--num-processes and --accelerate-config need --launcher accelerate",
                             "add --launcher accelerate")
    if options.launcher == "accelerate" and options.backend == "unsloth" and options.num_processes > 1:
        raise UserInputError("the unsloth backend trains on one GPU; multi-process training is the peft backend's",
                             "use --backend peft with --num-processes, or drop --num-processes")
    if options.num_processes > 1 and options.device != "cpu":
        from ollama_ft.estimate import visible_gpu_count

        gpus = visible_gpu_count()
        if 0 < gpus < options.num_processes:   # no GPU at all: the processes train on the CPU
            raise UserInputError(f"--num-processes {options.num_processes} needs one GPU per process; "
                                 f"{gpus} visible", f"use --num-processes {gpus}")
    config = options.accelerate_config
    if config is not None and not Path(config).is_file():
        raise UserInputError(f"--accelerate-config {config}: no such file", "write one with `accelerate config`")
    return Launcher(options.launcher, options.num_processes, str(Path(config).resolve()) if config else None)


def build(recipe: Recipe, options: BuildOptions | None = None) -> BuildResult:
    """Run every stage for one backend; return what was done and the measured metrics."""
    options = options or BuildOptions()
    from ollama_ft.ollama_server import normalise_host
    from ollama_ft.preflight import preflight

    host = normalise_host(options.host or recipe.ollama.host)
    name = ollama_model_name(recipe, options)
    run_root = Path(options.runs_root) / recipe.stem / variant_name(options)
    ready = preflight(recipe, options, host, name, run_root)   # before any folder is made or model loads
    data, launcher = ready.data, ready.launcher
    run = RunDir(run_root)
    with run.lock():
        clean_partials(run.root)
        if options.force:
            run.drop_records(list(STAGES))
        elif options.from_stage:
            run.drop_records(list(STAGES[STAGES.index(options.from_stage):]))
        runner = _Runner(run, options)
        _build_stages(recipe, options, run, runner, host, name, data, launcher)
        runner.metrics["build"] = {"recipe": str(recipe.path), "backend": options.backend,
                                   "variant": variant_name(options), "model": name, "host": host,
                                   "ran": runner.ran, "skipped": runner.skipped}
        runner.write_metrics()
    return BuildResult(run.root, name, host, runner.ran, runner.skipped, runner.metrics)


def _build_stages(recipe: Recipe, options: BuildOptions, run: RunDir, runner: _Runner, host: str, name: str,
                  data, launcher) -> None:
    from ollama_ft.base_model import resolve_base

    base = resolve_base(recipe, Path(options.runs_root), host)
    base_path, base_fp = base.path, base.fingerprint
    tokenizer_config = base_tokenizer_config(base_path) if recipe.model.chat_template == "auto" else {}
    template = choose_template(recipe.model.chat_template, tokenizer_config.get("chat_template"), recipe.model.base,
                             special_token(tokenizer_config, "eos_token"))
    examples = [asdict(e) for e in data.train]
    for e in examples:
        e.pop("source", None)
    check_examples_render(template, examples, [e.source for e in data.train])
    validation = [{k: v for k, v in asdict(e).items() if k != "source"} for e in data.validation]
    data_fp = fingerprint(examples, validation)
    model_section = recipe.model.model_dump()
    if options.qlora:
        model_section["load_in_4bit"] = True
    train_section = recipe.train.model_dump()
    if options.qlora and train_section["method"] in ("lora", "dora"):
        train_section["method"] = "qlora"
    assistant_only = recipe.train.assistant_only_loss
    if assistant_only is None:
        assistant_only = data.format != "text"

    # 1. train --------------------------------------------------------------------------------
    # The default launcher is left out, so runs made before launchers existed keep their key.
    train_key = fingerprint(base_fp, data_fp, model_section, train_section, template.jinja, options.backend,
                            assistant_only, *([launcher.describe()] if launcher.kind != "python" else [None]))

    def do_train() -> dict[str, Any]:
        from ollama_ft.backends import TrainJob
        from ollama_ft.train import TrainInput, train

        work = run.path("train")
        checkpoints = run.path("checkpoints")
        marker = checkpoints / "FINGERPRINT"
        if marker.is_file() and marker.read_text().strip() != train_key:
            shutil.rmtree(checkpoints)  # checkpoints of different settings cannot be resumed
        checkpoints.mkdir(parents=True, exist_ok=True)
        marker.write_text(train_key)
        job = TrainJob(backend=options.backend, base_path=base_path, examples_path=str(work / "examples.jsonl"),
                       validation_path=str(work / "validation.jsonl") if validation else None,
                       chat_jinja=template.jinja, output_dir=str(run.path("trained")), checkpoint_dir=str(checkpoints),
                       model=model_section, train=train_section, assistant_only_loss=assistant_only,
                       log_path=str(run.path("train.log")), device=options.device)

        estimate = memory_estimate(recipe, options)
        if estimate and estimate.get("warning"):
            options.reporter.stage("train", "warn", estimate["warning"])
            runner.log(f"train warning: {estimate['warning']}")

        def on_event(event: dict) -> None:
            if event.get("event") in ("step", "log") and event.get("total_steps"):
                loss = f"loss {event['loss']:.3f}" if "loss" in event else ""
                options.reporter.progress("train", event["step"], event["total_steps"], loss)

        result = train(TrainInput(job, examples, validation or None, work, launcher), on_event)
        out = asdict(result)
        out["launcher"] = launcher.describe()
        if estimate:   # beside the measured peak, so the estimate can be checked run by run
            out["memory_estimate"] = estimate
            out["peak_memory_vs_estimate"] = result.peak_memory_bytes / estimate["total_bytes"]
        out["data"] = data.summary()
        out["family"] = template.family
        out["chat_template"] = template.name
        out["trained_size_bytes"] = tree_size(Path(result.output_dir))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the finished output supersedes them
        return out

    trained = runner.stage("train", train_key, do_train, lambda o: Path(o["output_dir"]).exists())

    # 2. merge --------------------------------------------------------------------------------
    samples = sample_texts(examples, template)
    merge_key = fingerprint(train_key, "merge-v2")  # v2: ships the base's SentencePiece files

    def do_merge() -> dict[str, Any]:
        from ollama_ft.merge import MergeInput, merge_adapter

        warning = export_ram_warning(recipe, options)
        if warning:
            options.reporter.stage("merge", "warn", warning)
            runner.log(f"merge warning: {warning}")
        ensure_disk(run.root, trained["total_parameters"] * 4 if trained["kind"] == "adapter" else
                    trained["trained_size_bytes"], "merge")
        out = merge_adapter(MergeInput(Path(base_path), Path(trained["output_dir"]), trained["kind"], template.jinja,
                                       samples, run.path("merged"), recipe.model.trust_remote_code))
        return {"merged_path": str(out.merged_path), "max_abs_logit_diff": out.max_abs_logit_diff,
                "tolerance": out.tolerance, "dtype": out.dtype, "saved_dtype": out.saved_dtype,
                "size_bytes": tree_size(out.merged_path)}

    merged = runner.stage("merge", merge_key, do_merge, lambda o: Path(o["merged_path"]).exists())

    # 3. convert ------------------------------------------------------------------------------
    convert_key = fingerprint(merge_key, recipe.export.logits_tolerance, "convert-v1",
                              *([str(base.source_gguf)] if base.source_gguf else []))

    def do_convert() -> dict[str, Any]:
        from ollama_ft.convert import ConvertInput, convert_to_gguf

        ensure_disk(run.root, merged["size_bytes"], "convert")
        out = convert_to_gguf(ConvertInput(Path(merged["merged_path"]), run.path("model-f16.gguf"), samples,
                                           recipe.export.logits_tolerance, run.path("convert.log"),
                                           base.source_gguf))
        return {"gguf_path": str(out.gguf_path), "size_bytes": out.size_bytes,
                "max_rel_logit_diff": out.max_rel_logit_diff, "top1_agreement": out.top1_agreement}

    f16 = runner.stage("convert", convert_key, do_convert, lambda o: Path(o["gguf_path"]).exists())

    # 4. imatrix: an importance matrix from the recipe's own examples (export.imatrix) ---------
    calibration, held_out = quality_texts(examples, validation, template)
    imatrix_path, imatrix_fp = None, None
    if recipe.export.imatrix == "auto":
        imatrix_key = fingerprint(convert_key, calibration, "imatrix-v1")

        def do_imatrix() -> dict[str, Any]:
            from ollama_ft.imatrix import ImatrixInput, compute_imatrix

            out = compute_imatrix(ImatrixInput(Path(f16["gguf_path"]), calibration, run.path("imatrix.gguf"),
                                               run.path("imatrix.log")))
            return {**asdict(out), "path": str(out.path)}

        matrix = runner.stage("imatrix", imatrix_key, do_imatrix, lambda o: Path(o["path"]).exists())
        imatrix_path, imatrix_fp = Path(matrix["path"]), matrix["sha256"]
    elif recipe.export.imatrix != "none":
        imatrix_path = recipe.resolve(recipe.export.imatrix)
        imatrix_fp = file_digest(imatrix_path)

    # 5. quantize: one type, or the smallest of several that meets the quality floor -----------
    export = recipe.export
    if export.chooses_by_quality:
        quant_key = fingerprint(convert_key, export.candidates, imatrix_fp, export.max_kld, export.min_top1,
                                held_out, recipe.eval.candidates, "choose-v1")
    else:   # a single type without a matrix keeps the key runs made before matrices existed
        quant_key = fingerprint(convert_key, export.quantization, *([imatrix_fp] if imatrix_fp else []))

    def do_quantize() -> dict[str, Any]:
        from ollama_ft.quantize import QuantizeInput, quantize_gguf

        ensure_disk(run.root, f16["size_bytes"] * (len(export.candidates) if export.chooses_by_quality else 1),
                    "quantize")
        quality: dict[str, Any] = {}
        if export.chooses_by_quality:
            from ollama_ft.quant_quality import ChoiceInput, as_records, quantize_by_quality

            choice = quantize_by_quality(ChoiceInput(Path(f16["gguf_path"]), export.candidates, held_out, run.root,
                                                     export.max_kld, export.min_top1, imatrix_path,
                                                     str(export.imatrix), keep_candidates=recipe.eval.candidates))
            out = choice.chosen
            quality = {"quality": {"candidates": as_records(choice.figures), "chosen": out.file_type_name,
                                   "max_kld": export.max_kld, "min_top1": export.min_top1,
                                   "imatrix": str(export.imatrix),
                                   "report_md": str(choice.report_md), "plot": str(choice.plot),
                                   "kept": {q: str(p) for q, p in choice.kept.items()}}}
        else:
            out = quantize_gguf(QuantizeInput(Path(f16["gguf_path"]), run.path(f"model-{export.quantization}.gguf"),
                                              export.quantization, log_path=run.path("quantize.log"),
                                              imatrix=imatrix_path))
        hashed_stat = list(file_stat(out.gguf_path))   # taken before hashing: a later change shows in it
        return {"gguf_path": str(out.gguf_path), "size_bytes": out.size_bytes, "file_type": out.file_type,
                "quant_type": out.file_type_name, "tensor_types": out.tensor_types,
                "imatrix": str(imatrix_path) if imatrix_path else None,
                "sha256": file_digest(out.gguf_path), "hashed_stat": hashed_stat, **quality}

    def quantized_files_exist(outputs: dict) -> bool:
        kept = (outputs.get("quality") or {}).get("kept") or {}
        return all(Path(p).exists() for p in [outputs["gguf_path"], *kept.values()])

    quantized = runner.stage("quantize", quant_key, do_quantize, quantized_files_exist)
    quant = quantized["quant_type"]
    if not export.keep_f16 and quant != "f16":
        Path(f16["gguf_path"]).unlink(missing_ok=True)

    # 6. tokenizer gate -----------------------------------------------------------------------
    tokenizer_key = fingerprint(quant_key, quantized["sha256"], data_fp, "tokenizer-v1")

    def do_tokenizer_gate() -> dict[str, Any]:
        from ollama_ft.tokenizer_gate import TokenizerGateInput, check_tokenizer

        out = check_tokenizer(TokenizerGateInput(Path(quantized["gguf_path"]), Path(trained["output_dir"]),
                                                 template.jinja, examples, [e.source for e in data.train],
                                                 recipe.model.max_seq_length, seed=recipe.train.seed))
        return asdict(out)

    gate = runner.stage("tokenizer", tokenizer_key, do_tokenizer_gate)

    # 7. modelfile ----------------------------------------------------------------------------
    from ollama_ft.modelfile import ModelfileSpec, write_modelfile

    parameters: dict[str, Any] = {"num_ctx": recipe.model.max_seq_length, **recipe.ollama.parameters}
    spec = ModelfileSpec(gguf_path=Path(quantized["gguf_path"]),
                         template=recipe.ollama.template or template.go_template, stops=list(template.stop),
                         system=recipe.ollama.system if recipe.ollama.system is not None else recipe.data.system_prompt,
                         parameters=parameters)
    modelfile_key = fingerprint(quant_key, quantized["sha256"], spec.template, spec.stops, spec.system, parameters)
    runner.stage("modelfile", modelfile_key,
                 lambda: {"modelfile_path": str(write_modelfile(spec, run.path("Modelfile")))},
                 lambda o: Path(o["modelfile_path"]).exists())

    # 8. register -----------------------------------------------------------------------------
    from ollama_ft.ollama_server import client_for, ollama_call
    from ollama_ft.register import RegisterInput, model_exists, register_model

    register_key = fingerprint(modelfile_key, name, host)
    previous = run.read_record("register")
    # A model this run folder registered before is ours to replace; anyone else's needs --force.
    owned = previous is not None and previous.outputs.get("name") == name and previous.outputs.get("host") == host

    def do_register() -> dict[str, Any]:
        from ollama_ft.prompt_gate import PromptGateInput, check_prompt_parity, drop_gate_model

        def prompt_parity(digest: str):
            return check_prompt_parity(PromptGateInput(host, spec, digest, template.jinja, template.eos_token))

        out = register_model(RegisterInput(name, host, spec, force=options.force or owned,
                                           expected_digest=quantized["sha256"],
                                           hashed_stat=quantized.get("hashed_stat"), before_create=prompt_parity))
        drop_gate_model(host, out.gate.model)
        if out.gate.method == "unverified":
            options.reporter.stage("register", "warn", f"prompt parity not checked: {out.gate.note}")
            runner.log(f"register warning: prompt parity not checked: {out.gate.note}")
        return {"name": out.name, "host": out.host, "blob_digest": out.blob_digest, "replaced": out.replaced,
                "blob_transfer": out.blob_transfer, "prompt_parity": asdict(out.gate),
                "command": f"ollama run {name}"}

    def still_registered(outputs: dict) -> bool:
        client = client_for(host)
        return ollama_call(host, lambda: model_exists(client, name))

    runner.stage("register", register_key, do_register, still_registered)

    # 9. smoke --------------------------------------------------------------------------------
    from ollama_ft.smoke import SmokeInput, smoke_test

    first = next((e for e in examples if e.get("messages")), None)
    prompt = [m for m in first["messages"] if m["role"] != "assistant"][:2] if first else \
        [{"role": "user", "content": "Merhaba!"}]
    if prompt[-1]["role"] != "user":
        prompt.append({"role": "user", "content": "Merhaba!"})
    smoke_key = fingerprint(register_key, prompt)
    # What the build's own checks said, for the message if Ollama's runner dies anyway.
    evidence = (f"merge logits within {merged['max_abs_logit_diff']:.3g}, GGUF logits within "
                f"{f16['max_rel_logit_diff']:.3g} of their range, tokenizer ids equal on "
                f"{gate['checked']}/{gate['total']} examples")
    runner.stage("smoke", smoke_key, lambda: asdict(smoke_test(SmokeInput(name, host, prompt, evidence=evidence))))

    # 10. baseline: the untrained base, exported and registered the same way (eval.baseline) ---
    baseline_name = None
    if recipe.eval.suite and recipe.eval.baseline and not options.skip_eval:
        baseline_name = name.split(":", 1)[0] + ":base"
        baseline_key = fingerprint(base_fp, template.jinja, spec.template, spec.stops, spec.system, parameters,
                                   quant, baseline_name, host, *([imatrix_fp] if imatrix_fp else []))

        def do_baseline() -> dict[str, Any]:
            return export_baseline(Path(base_path), run.path("baseline"), samples, recipe, spec, quant,
                                   baseline_name, host, base.source_gguf, imatrix_path)

        runner.stage("baseline", baseline_key, do_baseline, still_registered_as(host, baseline_name))

    # 11. eval ---------------------------------------------------------------------------------
    if recipe.eval.suite and not options.skip_eval:
        suite_path = recipe.resolve(recipe.eval.suite)
        sampled = [recipe.eval.sample] if recipe.eval.sample else []   # unset keeps earlier fingerprints
        others = candidate_models(quantized, name) if recipe.eval.candidates else {}
        eval_key = fingerprint(smoke_key, file_digest(suite_path), recipe.eval.concurrency, baseline_name, *sampled,
                               *([sorted(others)] if others else []))

        def do_eval() -> dict[str, Any]:
            from ollama_ft.eval_suite import load_suite
            from ollama_ft.evaluate import compare_reports, evaluate_model, write_report

            suite = load_suite(suite_path)
            if recipe.eval.sample:
                suite = suite.sample(recipe.eval.sample)

            def progress(done: int, total: int) -> None:
                options.reporter.progress("eval", done, total)

            report = evaluate_model(host, name, suite, concurrency=recipe.eval.concurrency, progress=progress)
            before = None
            if baseline_name:
                before = evaluate_model(host, baseline_name, suite, concurrency=recipe.eval.concurrency,
                                        progress=progress)
            md, js = write_report(report, run.path("eval"), baseline=before)
            out = {"report_md": str(md), "report_json": str(js), **eval_summary(report)}
            if before is not None:
                out["baseline"] = {"model": baseline_name, **eval_summary(before)}
                out["delta"] = {k: v.model_dump() for k, v in compare_reports(report, before).items()}
            if others:
                from ollama_ft.quant_quality import add_pass_rates

                out["candidates"] = evaluate_candidates(others, spec, host, suite, recipe.eval.concurrency,
                                                        run.path("eval"), progress)
                rates = {quant: c["pass_rate"] for quant, c in out["candidates"].items()}
                add_pass_rates(quantized["quality"], {**rates, quantized["quant_type"]: report.pass_rate})
            return out

        runner.stage("eval", eval_key, do_eval, lambda o: Path(o["report_json"]).exists())


def candidate_models(quantized: dict[str, Any], name: str) -> dict[str, Path]:
    """Ollama name -> GGUF of each kept quantization candidate but the shipped one (eval.candidates)."""
    kept = (quantized.get("quality") or {}).get("kept") or {}
    return {f"{name.split(':', 1)[0]}:{quant}": Path(path) for quant, path in kept.items()
            if quant != quantized["quant_type"]}


def evaluate_candidates(models: dict[str, Path], spec, host: str, suite, concurrency: int, folder: Path,
                        progress) -> dict[str, Any]:
    """Register each candidate GGUF under its own tag with the shipped Modelfile and run the suite on it."""
    from dataclasses import replace as dc_replace

    from ollama_ft.evaluate import evaluate_model, write_report
    from ollama_ft.register import RegisterInput, register_model

    results = {}
    for model, gguf in models.items():
        # The tags belong to this recipe's builds, so replacing them needs no --force.
        register_model(RegisterInput(model, host, dc_replace(spec, gguf_path=gguf), force=True))
        report = evaluate_model(host, model, suite, concurrency=concurrency, progress=progress)
        md, _ = write_report(report, folder / model.split(":", 1)[1])
        results[model.split(":", 1)[1]] = {"model": model, "report_md": str(md), **eval_summary(report)}
    return results


def still_registered_as(host: str, name: str) -> Callable[[dict], bool]:
    def check(outputs: dict) -> bool:
        from ollama_ft.ollama_server import client_for, ollama_call
        from ollama_ft.register import model_exists

        client = client_for(host)
        return ollama_call(host, lambda: model_exists(client, name))
    return check


def export_baseline(base_path: Path, folder: Path, samples: list[str], recipe: Recipe, spec, quant: str,
                    name: str, host: str, source_gguf: Path | None = None,
                    imatrix: Path | None = None) -> dict[str, Any]:
    """The untrained base through the same convert → quantize → register path as the fine-tune:
    the type the fine-tune shipped, with the fine-tune's importance matrix (same tensor names)."""
    from dataclasses import replace as dc_replace

    from ollama_ft.convert import ConvertInput, convert_to_gguf
    from ollama_ft.quantize import QuantizeInput, quantize_gguf
    from ollama_ft.register import RegisterInput, register_model

    folder.mkdir(parents=True, exist_ok=True)
    f16 = convert_to_gguf(ConvertInput(base_path, folder / "model-f16.gguf", samples,
                                       recipe.export.logits_tolerance, folder / "convert.log", source_gguf))
    q = quantize_gguf(QuantizeInput(f16.gguf_path, folder / f"model-{quant}.gguf", quant,
                                    log_path=folder / "quantize.log", imatrix=imatrix))
    # The baseline tag belongs to this recipe's builds, so replacing it needs no --force.
    register_model(RegisterInput(name, host, dc_replace(spec, gguf_path=q.gguf_path), force=True))
    return {"model": name, "gguf_path": str(q.gguf_path), "size_bytes": q.size_bytes}


def eval_summary(report) -> dict[str, Any]:
    """The few eval figures that metrics.json and compare need (the full report is its own file)."""
    data = report.model_dump() if hasattr(report, "model_dump") else dict(report)
    keep = ("pass_rate", "held_in_pass_rate", "held_out_pass_rate", "by_category", "tokens_per_second")
    return {k: data[k] for k in keep if k in data}
