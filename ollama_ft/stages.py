"""One function per build stage: what it gets, its fingerprint, and its typed output.

Each function asks the runner to run its work unless the stage's record has the same fingerprint
(the same inputs) and its files are still there; either way it returns the same typed output,
rebuilt from the record. A stage's key includes the key of the stage it reads, so changing
anything redoes exactly the stages downstream of it. The work itself lives in the stage modules
(train.py, merge.py, convert.py, …); this file only wires them.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ollama_ft.context import BuildContext, quality_texts
from ollama_ft.errors import OllamaFtError
from ollama_ft.formatting import format_bytes
from ollama_ft.runs import (RunDir, StageRecord, atomic_write_json, file_digest, file_stat, fingerprint, tree_size,
                            weights_size)

if TYPE_CHECKING:
    from ollama_ft.soft_prompt import SoftTokens


class Runner:
    """Runs stages in order, skipping those whose record's fingerprint matches; keeps metrics.json.

    `report=False` keeps a nested runner (the baseline's) out of the progress display."""

    def __init__(self, ctx: BuildContext, run: RunDir, report: bool = True):
        self.ctx, self.run, self.report = ctx, run, report
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.metrics: dict[str, Any] = {}

    def _show(self, name: str, status: str, detail: str = "") -> None:
        if self.report:
            self.ctx.options.reporter.stage(name, status, detail)

    def stage(self, name: str, key: str, work: Callable[[], dict[str, Any]],
              still_valid: Callable[[dict], bool] = lambda outputs: True) -> StageRecord:
        """The stage's record: the one on disk if it still holds, else the one running `work` writes."""
        label = name if self.run.root == self.ctx.run.root else f"{self.run.root.name}/{name}"
        record = self.run.read_record(name)
        if record and record.fingerprint == key and still_valid(record.outputs):
            self.ctx.log(f"{label} skipped (fingerprint {key} unchanged)")
            self.skipped.append(name)
            self._show(name, "skip")
            self.metrics[name] = {**record.outputs, "seconds": record.seconds, "skipped": True}
            return record
        self.run.drop_records([name])
        self._show(name, "start")
        self.ctx.log(f"{label} started (fingerprint {key})")
        start = time.perf_counter()
        try:
            outputs = work()
        except BaseException as exc:
            self.ctx.log(f"{label} failed after {time.perf_counter() - start:.1f}s: {type(exc).__name__}: {exc}")
            raise
        seconds = time.perf_counter() - start
        self.ctx.log(f"{label} done in {seconds:.1f}s")
        record = StageRecord(stage=name, fingerprint=key, outputs=outputs, seconds=seconds)
        self.run.write_record(record)
        self.ran.append(name)
        self.metrics[name] = {**outputs, "seconds": seconds, "skipped": False}
        self._show(name, "done", f"{seconds:.1f}s")
        self.write_metrics()
        return record

    def begin_group(self, name: str) -> None:
        """Show a stage whose work is a nested runner's stages as started; `group` ends it."""
        self._show(name, "start")

    def group(self, name: str, nested: Runner, seconds: float, summary: dict[str, Any]) -> None:
        """Count a nested runner's stages as one stage of this run (done if any of them ran)."""
        done = bool(nested.ran)
        (self.ran if done else self.skipped).append(name)
        self._show(name, "done" if done else "skip", f"{seconds:.1f}s" if done else "")
        self.metrics[name] = {**summary, "stages": nested.metrics, "seconds": seconds, "skipped": not done}
        self.write_metrics()

    def write_metrics(self) -> None:
        atomic_write_json(self.run.path("metrics.json"), self.metrics)


def _pick(cls, outputs: dict[str, Any]) -> dict[str, Any]:
    """The record's fields that `cls` has (records also hold figures only metrics.json shows)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in outputs.items() if k in names}


def ensure_disk(folder: Path, need_bytes: int, stage: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need_bytes * 1.1 > free:
        raise OllamaFtError(f"{stage}: needs about {format_bytes(need_bytes)} in {folder}, only "
                            f"{format_bytes(free)} free", "free some disk or use --runs-dir on a larger disk")


# 1. train ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trained:
    key: str
    seconds: float
    result: Any                  # backends.TrainResult
    trained_size_bytes: int
    finished_at: float           # when training finished (time.time()); earlier than this build if reused

    @property
    def output_dir(self) -> Path:
        return Path(self.result.output_dir)


def memory_estimate(recipe, options) -> dict[str, Any] | None:
    """`ollama-ft estimate` for what this build trains, on the device it trains on; None if unknown."""
    from ollama_ft.estimate import estimate_memory, training_device_bytes

    device_bytes, cpu = training_device_bytes(force_cpu=options.device == "cpu")
    try:
        est = estimate_memory(recipe, device_bytes=device_bytes, cpu=cpu, num_processes=options.num_processes)
    except OllamaFtError:
        return None   # a hub model whose config is not cached: nothing to estimate from
    return {"total_bytes": est.total_bytes, "breakdown": est.breakdown, "device_bytes": device_bytes,
            "device": "cpu" if cpu else "cuda", "fits": est.fits, "warning": est.warning,
            "host_bytes": est.host_bytes}


def train(ctx: BuildContext, runner: Runner) -> Trained:
    from ollama_ft.backends import TrainResult

    recipe, options, launcher = ctx.recipe, ctx.options, ctx.launcher
    # The default launcher is left out, so runs made before launchers existed keep their key.
    key = fingerprint(ctx.base.fingerprint, ctx.data_fp, recipe.model.model_dump(), recipe.train.model_dump(),
                      ctx.template.jinja, options.backend, ctx.assistant_only_loss,
                      *([launcher.describe()] if launcher.kind != "python" else [None]))

    def work() -> dict[str, Any]:
        from ollama_ft.backends import TrainJob
        from ollama_ft.train import TrainInput, train as run_training

        run = ctx.run
        checkpoints = run.path("checkpoints")
        marker = checkpoints / "FINGERPRINT"
        if marker.is_file() and marker.read_text().strip() != key:
            shutil.rmtree(checkpoints)  # checkpoints of different settings cannot be resumed
        checkpoints.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
        work_dir = run.path("train")
        job = TrainJob(backend=options.backend, base_path=ctx.base.path,
                       examples_path=str(work_dir / "examples.jsonl"),
                       validation_path=str(work_dir / "validation.jsonl") if ctx.validation else None,
                       chat_jinja=ctx.template.jinja, output_dir=str(run.path("trained")),
                       checkpoint_dir=str(checkpoints), model=recipe.model.model_dump(),
                       train=recipe.train.model_dump(), assistant_only_loss=ctx.assistant_only_loss,
                       log_path=str(run.path("train.log")), device=options.device)
        estimate = memory_estimate(recipe, options)
        if estimate and estimate.get("warning"):
            ctx.warn("train", estimate["warning"])

        def on_event(event: dict) -> None:
            if event.get("event") in ("step", "log") and event.get("total_steps"):
                loss = f"loss {event['loss']:.3f}" if "loss" in event else ""
                options.reporter.progress("train", event["step"], event["total_steps"], loss)

        result = run_training(TrainInput(job, ctx.examples, ctx.validation or None, work_dir, launcher), on_event)
        out = {**asdict(result), "launcher": launcher.describe()}
        if estimate:   # beside the measured peak, so the estimate can be checked run by run
            out["memory_estimate"] = estimate
            out["peak_memory_vs_estimate"] = result.peak_memory_bytes / estimate["total_bytes"]
        out.update(data=ctx.data.summary(), family=ctx.template.family, chat_template=ctx.template.name,
                   trained_size_bytes=weights_size(Path(result.output_dir)))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the finished output supersedes them
        return out

    done = runner.stage("train", key, work, lambda o: Path(o["output_dir"]).exists())
    return Trained(key, done.seconds, TrainResult(**_pick(TrainResult, done.outputs)),
                   done.outputs["trained_size_bytes"], done.finished_at)


# 2. merge ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Merged:
    key: str
    seconds: float
    merged_path: Path
    max_abs_logit_diff: float
    size_bytes: int
    soft: SoftTokens | None = None   # a soft prompt baked in as extra tokens


def export_ram_warning(recipe, options) -> str | None:
    """A warning when merge and the GGUF check need more RAM than is available now, else None.

    Not an error: swap, or an estimate on the high side, can still see the build through; but if
    the kernel kills it, the person has already read why."""
    from ollama_ft.estimate import available_ram_bytes

    need = (memory_estimate(recipe, options) or {}).get("host_bytes")
    available = available_ram_bytes()
    if not need or available is None or need <= available:
        return None
    return (f"merge and the GGUF check hold the model in RAM, about {format_bytes(need)}, and "
            f"{format_bytes(available)} is available: the build may be killed for memory; close other "
            "programs and rerun: the finished train stage is kept and skipped")


def merge(ctx: BuildContext, runner: Runner, trained: Trained) -> Merged:
    key = fingerprint(trained.key, "merge-v2")  # v2: ships the base's SentencePiece files

    def work() -> dict[str, Any]:
        from ollama_ft.merge import MergeInput, merge_adapter

        warning = export_ram_warning(ctx.recipe, ctx.options)
        if warning:
            ctx.warn("merge", warning)
        result = trained.result
        ensure_disk(ctx.run.root, result.total_parameters * 4 if result.kind != "full" else
                    trained.trained_size_bytes, "merge")
        out = merge_adapter(MergeInput(Path(ctx.base.path), trained.output_dir, result.kind, ctx.template.jinja,
                                       ctx.samples, ctx.run.path("merged"), ctx.recipe.model.trust_remote_code))
        return {"merged_path": str(out.merged_path), "max_abs_logit_diff": out.max_abs_logit_diff,
                "tolerance": out.tolerance, "dtype": out.dtype, "saved_dtype": out.saved_dtype,
                "size_bytes": tree_size(out.merged_path),
                **({"soft_prompt": asdict(out.soft_tokens)} if out.soft_tokens else {})}

    done = runner.stage("merge", key, work, lambda o: Path(o["merged_path"]).exists())
    soft = done.outputs.get("soft_prompt")
    if soft:
        from ollama_ft.soft_prompt import SoftTokens

        soft = SoftTokens(**soft)
    return Merged(key, done.seconds, Path(done.outputs["merged_path"]), done.outputs["max_abs_logit_diff"],
                  done.outputs["size_bytes"], soft or None)


# 3. convert (the fine-tune, or the untrained base for the baseline) --------------------------

@dataclass(frozen=True)
class Converted:
    key: str
    seconds: float
    gguf_path: Path
    size_bytes: int
    max_rel_logit_diff: float
    top1_agreement: float


def convert(ctx: BuildContext, runner: Runner, model_dir: Path, size_bytes: int, upstream_key: str,
            soft=None) -> Converted:
    """`soft` (a baked soft prompt's SoftTokens): the GGUF keeps the extra tokens, adds no BOS of
    its own when the template writes it, and must pass the soft-prompt gate against PEFT too."""
    source_gguf = ctx.base.source_gguf
    tolerance = ctx.recipe.export.logits_tolerance
    key = fingerprint(upstream_key, tolerance, "convert-v1", *([str(source_gguf)] if source_gguf else []),
                      *(["soft-v1"] if soft else []))

    def work() -> dict[str, Any]:
        from ollama_ft.convert import ConvertInput, convert_to_gguf

        ensure_disk(runner.run.root, size_bytes, "convert")
        extra: dict[str, Any] = {}
        if soft:
            from ollama_ft.soft_prompt import export_gate

            # The reference is PEFT itself: the base with the trained adapter the train stage saved.
            extra = dict(added_tokens=len(soft.tokens), add_bos=False if soft.bos_token else None,
                         extra_gate=export_gate(Path(ctx.base.path), ctx.run.path("trained"), soft,
                                                ctx.samples, tolerance))
        out = convert_to_gguf(ConvertInput(model_dir, runner.run.path("model-f16.gguf"), ctx.samples,
                                           tolerance, runner.run.path("convert.log"), source_gguf, **extra))
        return {"gguf_path": str(out.gguf_path), "size_bytes": out.size_bytes,
                "max_rel_logit_diff": out.max_rel_logit_diff, "top1_agreement": out.top1_agreement,
                **({"soft_prompt_gate": out.extra_gate} if out.extra_gate else {})}

    done = runner.stage("convert", key, work, lambda o: Path(o["gguf_path"]).exists())
    return Converted(key, done.seconds, Path(done.outputs["gguf_path"]), done.outputs["size_bytes"],
                     done.outputs["max_rel_logit_diff"], done.outputs["top1_agreement"])


# 4. imatrix: an importance matrix from the recipe's own examples (export.imatrix) -------------

@dataclass(frozen=True)
class Matrix:
    path: Path | None            # None: quantize without one
    fingerprint: str | None


def imatrix(ctx: BuildContext, runner: Runner, f16: Converted) -> Matrix:
    setting = ctx.recipe.export.imatrix
    if setting == "none":
        return Matrix(None, None)
    if setting != "auto":
        path = ctx.recipe.resolve(setting)
        return Matrix(path, file_digest(path))
    calibration, _ = quality_texts(ctx.examples, ctx.validation, ctx.template)
    key = fingerprint(f16.key, calibration, "imatrix-v1")

    def work() -> dict[str, Any]:
        from ollama_ft.imatrix import ImatrixInput, compute_imatrix

        out = compute_imatrix(ImatrixInput(f16.gguf_path, calibration, ctx.run.path("imatrix.gguf"),
                                           ctx.run.path("imatrix.log")))
        return {**asdict(out), "path": str(out.path)}

    outputs = runner.stage("imatrix", key, work, lambda o: Path(o["path"]).exists()).outputs
    return Matrix(Path(outputs["path"]), outputs["sha256"])


# 5. quantize: one type, or the smallest of several that meets the quality floor -------------

@dataclass(frozen=True)
class Quantized:
    key: str
    seconds: float
    gguf_path: Path
    size_bytes: int
    quant_type: str
    sha256: str
    hashed_stat: list[int] | None
    quality: dict[str, Any] | None       # export.quantization = list | "auto": every candidate's figures

    @property
    def kept(self) -> dict[str, Path]:
        """Quantization type -> GGUF of each candidate kept for eval.candidates (the shipped one too)."""
        return {q: Path(p) for q, p in ((self.quality or {}).get("kept") or {}).items()}

    @property
    def candidate_count(self) -> int:
        return len(self.quality["candidates"]) if self.quality else 1

    @property
    def shipped_figures(self) -> dict[str, Any] | None:
        """The shipped type's measured quality (mean_kld, top1_agreement, …), when types were compared."""
        if not self.quality:
            return None
        return next(c for c in self.quality["candidates"] if c["quant_type"] == self.quant_type)

    @property
    def report_md(self) -> str | None:
        return self.quality["report_md"] if self.quality else None


def quantize(ctx: BuildContext, runner: Runner, f16: Converted, matrix: Matrix, export=None) -> Quantized:
    """`export`: the recipe's [export] unless the caller (the baseline) fixes the type."""
    export = export or ctx.recipe.export
    if export.chooses_by_quality:
        _, held_out = quality_texts(ctx.examples, ctx.validation, ctx.template)
        key = fingerprint(f16.key, export.candidates, matrix.fingerprint, export.max_kld, export.min_top1,
                          held_out, ctx.recipe.eval.candidates, "choose-v1")
    else:   # a single type without a matrix keeps the key runs made before matrices existed
        key = fingerprint(f16.key, export.quantization, *([matrix.fingerprint] if matrix.fingerprint else []))
    run = runner.run

    def work() -> dict[str, Any]:
        from ollama_ft.quantize import QuantizeInput, quantize_gguf

        ensure_disk(run.root, f16.size_bytes * (len(export.candidates) if export.chooses_by_quality else 1),
                    "quantize")
        quality: dict[str, Any] = {}
        if export.chooses_by_quality:
            from ollama_ft.quant_quality import ChoiceInput, as_records, quantize_by_quality

            choice = quantize_by_quality(ChoiceInput(f16.gguf_path, export.candidates, held_out, run.root,
                                                     export.max_kld, export.min_top1, matrix.path,
                                                     str(export.imatrix), keep_candidates=ctx.recipe.eval.candidates))
            out = choice.chosen
            quality = {"quality": {"candidates": as_records(choice.figures), "chosen": out.file_type_name,
                                   "max_kld": export.max_kld, "min_top1": export.min_top1,
                                   "imatrix": str(export.imatrix),
                                   "report_md": str(choice.report_md), "plot": str(choice.plot),
                                   "kept": {q: str(p) for q, p in choice.kept.items()}}}
        else:
            out = quantize_gguf(QuantizeInput(f16.gguf_path, run.path(f"model-{export.quantization}.gguf"),
                                              export.quantization, log_path=run.path("quantize.log"),
                                              imatrix=matrix.path))
        hashed_stat = list(file_stat(out.gguf_path))   # taken before hashing: a later change shows in it
        return {"gguf_path": str(out.gguf_path), "size_bytes": out.size_bytes, "file_type": out.file_type,
                "quant_type": out.file_type_name, "tensor_types": out.tensor_types,
                "imatrix": str(matrix.path) if matrix.path else None,
                "sha256": file_digest(out.gguf_path), "hashed_stat": hashed_stat, **quality}

    def files_exist(outputs: dict) -> bool:
        kept = (outputs.get("quality") or {}).get("kept") or {}
        return all(Path(p).exists() for p in [outputs["gguf_path"], *kept.values()])

    done = runner.stage("quantize", key, work, files_exist)
    outputs = done.outputs
    quantized = Quantized(key, done.seconds, Path(outputs["gguf_path"]), outputs["size_bytes"], outputs["quant_type"],
                          outputs["sha256"], outputs.get("hashed_stat"), outputs.get("quality"))
    if not export.keep_f16 and quantized.quant_type != "f16":
        f16.gguf_path.unlink(missing_ok=True)
    return quantized


# 6. tokenizer gate: the GGUF's tokenizer gives the ids training saw --------------------------

@dataclass(frozen=True)
class TokenizerChecked:
    checked: int
    total: int


def tokenizer(ctx: BuildContext, runner: Runner, trained: Trained, quantized: Quantized,
              merged: Merged) -> TokenizerChecked:
    key = fingerprint(quantized.key, quantized.sha256, ctx.data_fp, "tokenizer-v1")

    def work() -> dict[str, Any]:
        from ollama_ft.tokenizer_gate import TokenizerGateInput, check_tokenizer

        return asdict(check_tokenizer(TokenizerGateInput(quantized.gguf_path, trained.output_dir, ctx.template.jinja,
                                                         ctx.examples, ctx.sources, ctx.recipe.model.max_seq_length,
                                                         seed=ctx.recipe.train.seed, soft=merged.soft)))

    outputs = runner.stage("tokenizer", key, work).outputs
    return TokenizerChecked(outputs["checked"], outputs["total"])


# 7. modelfile --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Modelfile:
    key: str
    spec: Any                    # modelfile.ModelfileSpec
    path: Path
    prefix: str = ""             # a baked soft prompt's tokens: the TEMPLATE's first text


def modelfile_spec(ctx: BuildContext, gguf_path: Path, soft=None):
    """The Modelfile for `gguf_path`. A baked soft prompt's tokens (`soft`) open the TEMPLATE, once
    per request as PEFT put them once per sequence, and Ollama keeps them when it shifts context."""
    from ollama_ft.modelfile import ModelfileSpec

    recipe, template = ctx.recipe, ctx.template
    parameters: dict[str, Any] = {"num_ctx": recipe.model.max_seq_length, **recipe.ollama.parameters}
    go_template, stops = recipe.ollama.template or template.go_template, list(template.stop)
    if soft:
        from ollama_ft.soft_prompt import STOP_TEXT

        go_template, stops = soft.prefix + go_template, [*stops, STOP_TEXT]
        parameters["num_keep"] = max(int(parameters.get("num_keep", 0)), soft.num_keep)
    return ModelfileSpec(gguf_path=gguf_path, template=go_template, stops=stops,
                         system=recipe.ollama.system if recipe.ollama.system is not None else recipe.data.system_prompt,
                         parameters=parameters)


def modelfile(ctx: BuildContext, runner: Runner, quantized: Quantized, merged: Merged) -> Modelfile:
    from ollama_ft.modelfile import write_modelfile

    spec = modelfile_spec(ctx, quantized.gguf_path, merged.soft)
    key = fingerprint(quantized.key, quantized.sha256, spec.template, spec.stops, spec.system, spec.parameters)
    outputs = runner.stage("modelfile", key,
                           lambda: {"modelfile_path": str(write_modelfile(spec, ctx.run.path("Modelfile")))},
                           lambda o: Path(o["modelfile_path"]).exists()).outputs
    return Modelfile(key, spec, Path(outputs["modelfile_path"]), merged.soft.prefix if merged.soft else "")


# 8. register: create the model in Ollama, once the prompt-parity gate passes -----------------

@dataclass(frozen=True)
class Registered:
    key: str
    name: str


def still_registered(host: str, name: str) -> Callable[[dict], bool]:
    def check(outputs: dict) -> bool:
        from ollama_ft.ollama_server import client_for, ollama_call
        from ollama_ft.register import model_exists

        client = client_for(host)
        return ollama_call(host, lambda: model_exists(client, name))
    return check


def registered_here(run: RunDir) -> tuple[str, str] | None:
    """(name, host) this run folder registered last: a model that is ours to replace."""
    record = run.read_record("register")
    outputs = record.outputs if record else {}
    return (outputs["name"], outputs["host"]) if "name" in outputs and "host" in outputs else None


def register(ctx: BuildContext, runner: Runner, written: Modelfile, quantized: Quantized) -> Registered:
    host, name = ctx.host, ctx.name
    key = fingerprint(written.key, name, host)
    # A model this run folder registered before is ours to replace; anyone else's needs --force.
    owned = registered_here(runner.run) == (name, host)

    def work() -> dict[str, Any]:
        from ollama_ft.prompt_gate import PromptGateInput, check_prompt_parity, drop_gate_model
        from ollama_ft.register import RegisterInput, register_model

        def prompt_parity(digest: str):
            return check_prompt_parity(PromptGateInput(host, written.spec, digest, ctx.template.jinja,
                                                       ctx.template.eos_token, prefix=written.prefix))

        out = register_model(RegisterInput(name, host, written.spec, force=ctx.options.force or owned,
                                           expected_digest=quantized.sha256, hashed_stat=quantized.hashed_stat,
                                           before_create=prompt_parity))
        drop_gate_model(host, out.gate.model)
        if out.gate.method == "unverified":
            ctx.warn("register", f"prompt parity not checked: {out.gate.note}")
        return {"name": out.name, "host": out.host, "blob_digest": out.blob_digest, "replaced": out.replaced,
                "blob_transfer": out.blob_transfer, "prompt_parity": asdict(out.gate),
                "command": f"ollama run {name}"}

    runner.stage("register", key, work, still_registered(host, name))
    return Registered(key, name)


# 9. smoke: one chat through Ollama's runner ---------------------------------------------------

@dataclass(frozen=True)
class Smoked:
    key: str


def smoke(ctx: BuildContext, runner: Runner, registered: Registered, merged: Merged, f16: Converted,
          gate: TokenizerChecked) -> Smoked:
    from ollama_ft.smoke import SmokeInput, smoke_test

    first = next((e for e in ctx.examples if e.get("messages")), None)
    prompt = [m for m in first["messages"] if m["role"] != "assistant"][:2] if first else \
        [{"role": "user", "content": "Merhaba!"}]
    if prompt[-1]["role"] != "user":
        prompt.append({"role": "user", "content": "Merhaba!"})
    key = fingerprint(registered.key, prompt)
    # What the build's own checks said, for the message if Ollama's runner dies anyway.
    evidence = (f"merge logits within {merged.max_abs_logit_diff:.3g}, GGUF logits within "
                f"{f16.max_rel_logit_diff:.3g} of their range, tokenizer ids equal on "
                f"{gate.checked}/{gate.total} examples")
    runner.stage("smoke", key, lambda: asdict(smoke_test(SmokeInput(registered.name, ctx.host, prompt,
                                                                     evidence=evidence))))
    return Smoked(key)


# 10. baseline: the untrained base through the same convert and quantize stages (eval.baseline)

@dataclass(frozen=True)
class Baseline:
    name: str
    gguf_path: Path
    size_bytes: int


def wants_eval(ctx: BuildContext) -> bool:
    return bool(ctx.recipe.eval.suite) and not ctx.options.skip_eval


def baseline(ctx: BuildContext, runner: Runner, written: Modelfile, quantized: Quantized,
             matrix: Matrix) -> Baseline | None:
    """Convert, quantize (the type the fine-tune shipped, with its importance matrix: the tensor
    names are the same) and register the base, as stages recorded in the run's baseline/ folder."""
    if not (wants_eval(ctx) and ctx.recipe.eval.baseline):
        return None
    from ollama_ft.register import RegisterInput, register_model

    name = ctx.name.split(":", 1)[0] + ":base"
    nested = Runner(ctx, RunDir(ctx.run.path("baseline")), report=False)
    runner.begin_group("baseline")
    started = time.perf_counter()
    base_dir = Path(ctx.base.path)
    f16 = convert(ctx, nested, base_dir, tree_size(base_dir) if base_dir.exists() else 0,
                  fingerprint(ctx.base.fingerprint, ctx.template.jinja, "baseline"))
    single = ctx.recipe.export.model_copy(update={"quantization": quantized.quant_type, "keep_f16": True})
    shipped = quantize(ctx, nested, f16, matrix, export=single)
    spec = modelfile_spec(ctx, shipped.gguf_path)   # the base has no soft prompt to open its TEMPLATE
    # The baseline tag belongs to this recipe's builds, so replacing it needs no --force.
    nested.stage("register", fingerprint(shipped.key, written.key, name, ctx.host),
                 lambda: {"name": register_model(RegisterInput(name, ctx.host, spec, force=True)).name},
                 still_registered(ctx.host, name))
    nested.write_metrics()
    result = Baseline(name, shipped.gguf_path, shipped.size_bytes)
    runner.group("baseline", nested, time.perf_counter() - started,
                 {"model": name, "gguf_path": str(result.gguf_path), "size_bytes": result.size_bytes})
    return result


# 11. eval: the recipe's Turkish suite through Ollama, beside the baseline and candidates -----

@dataclass(frozen=True)
class Evaluated:
    report_md: Path
    pass_rate: float
    held_in_pass_rate: float | None = None
    held_out_pass_rate: float | None = None
    by_category: dict[str, Any] | None = None


def evaluate(ctx: BuildContext, runner: Runner, smoked: Smoked, written: Modelfile, quantized: Quantized,
             base: Baseline | None) -> Evaluated | None:
    if not wants_eval(ctx):
        return None
    recipe, host, name = ctx.recipe, ctx.host, ctx.name
    suite_path = recipe.resolve(recipe.eval.suite)
    sampled = [recipe.eval.sample] if recipe.eval.sample else []   # unset keeps earlier fingerprints
    others = candidate_models(quantized, name) if recipe.eval.candidates else {}
    baseline_name = base.name if base else None
    key = fingerprint(smoked.key, file_digest(suite_path), recipe.eval.concurrency, baseline_name, *sampled,
                      *([sorted(others)] if others else []))

    def work() -> dict[str, Any]:
        from ollama_ft.eval_suite import load_suite
        from ollama_ft.evaluate import compare_reports, evaluate_model, write_report

        suite = load_suite(suite_path)
        if recipe.eval.sample:
            suite = suite.sample(recipe.eval.sample)

        def progress(done: int, total: int) -> None:
            ctx.options.reporter.progress("eval", done, total)

        report = evaluate_model(host, name, suite, concurrency=recipe.eval.concurrency, progress=progress)
        before = None
        if baseline_name:
            before = evaluate_model(host, baseline_name, suite, concurrency=recipe.eval.concurrency, progress=progress)
        md, js = write_report(report, ctx.run.path("eval"), baseline=before)
        out = {"report_md": str(md), "report_json": str(js), **eval_summary(report)}
        if before is not None:
            out["baseline"] = {"model": baseline_name, **eval_summary(before)}
            out["delta"] = {k: v.model_dump() for k, v in compare_reports(report, before).items()}
        if others:
            from ollama_ft.quant_quality import add_pass_rates

            out["candidates"] = evaluate_candidates(others, written.spec, host, suite, recipe.eval.concurrency,
                                                    ctx.run.path("eval"), progress)
            rates = {quant: c["pass_rate"] for quant, c in out["candidates"].items()}
            add_pass_rates(quantized.quality, {**rates, quantized.quant_type: report.pass_rate})
        return out

    outputs = runner.stage("eval", key, work, lambda o: Path(o["report_json"]).exists()).outputs
    return Evaluated(**{**_pick(Evaluated, outputs), "report_md": Path(outputs["report_md"])})


def candidate_models(quantized: Quantized, name: str) -> dict[str, Path]:
    """Ollama name -> GGUF of each kept quantization candidate but the shipped one (eval.candidates)."""
    return {f"{name.split(':', 1)[0]}:{quant}": path for quant, path in quantized.kept.items()
            if quant != quantized.quant_type}


def evaluate_candidates(models: dict[str, Path], spec, host: str, suite, concurrency: int, folder: Path,
                        progress) -> dict[str, Any]:
    """Register each candidate GGUF under its own tag with the shipped Modelfile and run the suite on it."""
    from ollama_ft.evaluate import evaluate_model, write_report
    from ollama_ft.register import RegisterInput, register_model

    results = {}
    for model, gguf in models.items():
        # The tags belong to this recipe's builds, so replacing them needs no --force.
        register_model(RegisterInput(model, host, replace(spec, gguf_path=gguf), force=True))
        report = evaluate_model(host, model, suite, concurrency=concurrency, progress=progress)
        md, _ = write_report(report, folder / model.split(":", 1)[1])
        results[model.split(":", 1)[1]] = {"model": model, "report_md": str(md), **eval_summary(report)}
    return results


def eval_summary(report) -> dict[str, Any]:
    """The few eval figures that metrics.json and compare need (the full report is its own file)."""
    data = report.model_dump() if hasattr(report, "model_dump") else dict(report)
    keep = ("pass_rate", "held_in_pass_rate", "held_out_pass_rate", "by_category", "tokens_per_second")
    return {k: data[k] for k in keep if k in data}
