"""What both backends share: tokenisation with assistant masks, the SFTTrainer settings, the
metrics callback, resume-from-checkpoint and a clean stop on Ctrl-C.

Both backends tokenise here, with the same code, so they see the same tokens in the same order;
only model loading and LoRA wrapping differ between them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from ollama_ft.backends import TrainJob, TrainResult

LINEAR_TARGETS_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_examples(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _render(tokenizer, jinja: str, messages: list[dict], generation_prompt: bool) -> str:
    # One renderer for training, the tokenizer gate and the template match (BOS left to the tokenizer).
    from ollama_ft.template_match import render

    return render(jinja, messages, add_generation_prompt=generation_prompt, eos_token=tokenizer.eos_token or "")


def tokenize_example(example: dict, tokenizer, jinja: str, assistant_only: bool) -> dict[str, list[int]]:
    """input_ids and assistant_masks for one example.

    A conversation is cut where each assistant answer starts: the text before it (rendered with
    the generation prompt, exactly what Ollama will send) and the answer through its end-of-turn
    marker. Each piece is tokenised on its own, so the boundary is exact.
    """
    if example.get("text") is not None:
        ids = tokenizer(example["text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    messages = example["messages"]
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    eos = tokenizer.eos_token or ""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    whole = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, jinja, messages[:i], True)
        full = _render(tokenizer, jinja, messages[: i + 1], False)
        if i != last and eos and full.endswith(eos):
            # A template (Phi-3) may end only the whole conversation with EOS, not each answer.
            whole = whole or _render(tokenizer, jinja, messages, False)
            if not whole.startswith(full) and whole.startswith(full[:-len(eos)]):
                full = full[:-len(eos)]
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("chat template is not prefix-stable; cannot mask assistant turns")
        head = tokenizer(prompt[len(done):], add_special_tokens=False).input_ids
        answer = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        ids += head + answer
        mask += [0] * len(head) + [1] * len(answer)
        done = full
    if adds_bos(tokenizer):
        ids, mask = [tokenizer.bos_token_id] + ids, [0] + mask
    if not assistant_only:
        mask = [1] * len(ids)
    return {"input_ids": ids, "assistant_masks": mask}


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first, as the GGUF's add_bos_token makes Ollama do.

    Asked of the tokenizer itself: transformers 5 keeps this in the fast tokenizer's post-processor,
    and an `add_bos_token` attribute is not always there to read."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def build_dataset(path: str, tokenizer, jinja: str, assistant_only: bool, max_length: int):
    """A tokenised datasets.Dataset plus counts of truncated and dropped examples."""
    from datasets import Dataset

    rows, truncated, dropped = [], 0, 0
    for example in read_examples(path):
        row = tokenize_example(example, tokenizer, jinja, assistant_only)
        if len(row["input_ids"]) > max_length:
            truncated += 1
            row = {k: v[:max_length] for k, v in row.items()}
            if not any(row["assistant_masks"]):
                dropped += 1  # nothing left to learn from once the answer is cut off
                continue
        rows.append(row)
    if not rows:
        raise DatasetTooLong(f"all {truncated} examples exceed model.max_seq_length = {max_length} tokens "
                             "before their answer starts; raise model.max_seq_length or shorten the prompts")
    return Dataset.from_list(rows), truncated, dropped


class DatasetTooLong(ValueError):
    pass


def resolve_targets(model, targets) -> list[str]:
    """`all-linear` → the names of every Linear layer but the LM head (same list for both backends)."""
    if targets != "all-linear":
        return list(targets)
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names) or LINEAR_TARGETS_LLAMA


def training_dtype(model_section: dict, device: str):
    import torch

    requested = model_section["dtype"]
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pick_device(job: TrainJob) -> str:
    import torch

    return "cuda" if job.device != "cpu" and torch.cuda.is_available() else "cpu"


def sft_config(job: TrainJob, device: str, dtype, **overrides):
    from trl import SFTConfig

    t = job.train
    bf16 = device == "cuda" and str(dtype) == "torch.bfloat16"
    fp16 = device == "cuda" and str(dtype) == "torch.float16"
    kwargs: dict[str, Any] = dict(
        output_dir=job.checkpoint_dir, seed=t["seed"], data_seed=t["seed"],
        learning_rate=t["learning_rate"], lr_scheduler_type=t["lr_scheduler"], warmup_steps=t["warmup_ratio"],  # a float < 1 is a ratio in transformers 5
        weight_decay=t["weight_decay"], optim=t["optimizer"],
        per_device_train_batch_size=t["batch_size"], gradient_accumulation_steps=t["gradient_accumulation"],
        num_train_epochs=t["epochs"], max_steps=t["max_steps"] or -1,
        gradient_checkpointing=t["gradient_checkpointing"],
        max_length=job.model["max_seq_length"], packing=t["packing"],
        logging_steps=t["logging_steps"], save_steps=t["save_steps"], save_total_limit=2,
        save_only_model=False, report_to=[] if t["report_to"] == "none" else [t["report_to"]],
        bf16=bf16, fp16=fp16, use_cpu=device == "cpu",
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        disable_tqdm=True, eval_strategy="no", remove_unused_columns=True,
        dataset_num_proc=None,
        # Under DDP every trainable weight takes part in each step; searching for unused ones
        # costs an extra pass over the autograd graph per step.
        ddp_find_unused_parameters=False,
    )
    if t["report_to"] == "tensorboard":
        # transformers 5 reads the TensorBoard folder from the environment only. Each build trains
        # in its own worker process; set it only when asked for, so training in-process without
        # TensorBoard (tests, library use) leaves no folder behind for later workers to inherit.
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(job.output_dir).parent / "tensorboard"))
    if t["gradient_checkpointing"]:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if full_fine_tune_across_processes(t):
        # Shard weights, gradients and optimizer state (FSDP) instead of one full copy per process;
        # FSDP does its own activation checkpointing in place of the Trainer's. GPUs only: on CPU
        # accelerate runs these processes as DDP over gloo.
        kwargs.update(fsdp=True, gradient_checkpointing=False,
                      fsdp_config={"version": 2, "reshard_after_forward": True,
                                   "activation_checkpointing": t["gradient_checkpointing"]})
        kwargs.pop("gradient_checkpointing_kwargs", None)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def full_fine_tune_across_processes(train_section: dict) -> bool:
    """Full fine-tuning in several processes, and no accelerate config file chose a strategy."""
    chosen = os.environ.get("ACCELERATE_USE_FSDP", "false") == "true" or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and train_section["method"] == "full" and not chosen


def parallelism(trainer) -> str:
    if trainer.args.world_size == 1:
        return "single"
    if trainer.is_fsdp_enabled:
        return "fsdp"
    return "deepspeed" if trainer.is_deepspeed_enabled else "ddp"


def make_callback(emit: Callable[[dict], None], history: list[dict], stop_flag: dict, timeline: list):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            emit({"event": "train_begin", "total_steps": state.max_steps, "step": state.global_step})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                entry = {"step": state.global_step, "loss": float(logs["loss"]),
                         "learning_rate": float(logs.get("learning_rate", 0.0)),
                         "tokens_seen": int(state.num_input_tokens_seen)}
                history.append(entry)
                emit({"event": "log", **entry, "total_steps": state.max_steps})

        def on_step_end(self, args, state, control, **kw):
            # (step, seconds, tokens) per optimizer step: lets benchmarks drop warm-up steps.
            timeline.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))
            emit({"event": "step", "step": state.global_step, "total_steps": state.max_steps})
            if stop_flag.get("stop"):
                # Ctrl-C: save a checkpoint at this step and stop, so a rerun resumes here.
                control.should_save = True
                control.should_training_stop = True

    return Progress()


def last_checkpoint(checkpoint_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None


def peak_memory(device: str) -> tuple[int, str]:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_rss"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "unsloth"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def batch_examples(inputs) -> list[list[int]]:
    """The examples in a collated batch, in order, whatever the collation: padded rows lose their
    padding; a padding-free row is cut where its position_ids start again at 0."""
    ids = inputs["input_ids"].tolist()
    mask = inputs.get("attention_mask")
    if mask is not None:
        return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask.tolist())]
    positions = inputs.get("position_ids")
    if positions is None:
        return ids
    examples = []
    for row, pos in zip(ids, positions.tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(row)]
        examples += [row[a:b] for a, b in zip(starts, starts[1:])]
    return examples


def callbacks_from_environment(device: str) -> list:
    """Extra Trainer callbacks for measurements: OLLAMA_FT_TRAINER_CALLBACKS="module:function,..."
    names functions called with the device that return a TrainerCallback or None
    (benchmarks/profiling.py is one)."""
    callbacks = []
    for name in filter(None, (n.strip() for n in os.environ.get("OLLAMA_FT_TRAINER_CALLBACKS", "").split(","))):
        module, colon, function = name.partition(":")
        if not (module and colon and function):
            raise ValueError(f"OLLAMA_FT_TRAINER_CALLBACKS: {name!r} is not module:function")
        callbacks.append(getattr(importlib.import_module(module), function)(device))
    return [callback for callback in callbacks if callback is not None]


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint."""


def run_sft(job: TrainJob, model, tokenizer, emit, *, device: str, dtype, kind: str,
            trainer_overrides: dict | None = None, config_overrides: dict | None = None,
            save: Callable[[Any, str], None] | None = None, speedups: list[str] | None = None) -> TrainResult:
    """Train `model` (already wrapped with LoRA, or full) with TRL's SFTTrainer; save to job.output_dir."""
    import torch
    from trl import SFTTrainer

    max_len = job.model["max_seq_length"]
    train_ds, truncated, dropped = build_dataset(job.examples_path, tokenizer, job.chat_jinja,
                                                 job.assistant_only_loss, max_len)
    eval_ds = None
    if job.validation_path:
        eval_ds, _, _ = build_dataset(job.validation_path, tokenizer, job.chat_jinja, job.assistant_only_loss, max_len)
    emit({"event": "data", "examples": len(train_ds), "truncated": truncated, "dropped": dropped})

    args = sft_config(job, device, dtype, **(config_overrides or {}))
    history: list[dict] = []
    stop_flag = {"stop": False}
    timeline: list[tuple[int, float, int]] = []
    callbacks = [make_callback(emit, history, stop_flag, timeline)]
    callbacks += callbacks_from_environment(device)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=callbacks, **(trainer_overrides or {}))
    if "fused_ce" in (speedups or []):
        from ollama_ft.kernels.fused_ce import patch_fused_cross_entropy

        # It stands in for TRL's chunked_nll loss only; other losses, and heads it does not cover, stay TRL's.
        if trainer.args.loss_type != "chunked_nll" or not patch_fused_cross_entropy(model):
            speedups.remove("fused_ce")

    # Hash what the first batches contain, in order: two backends with the same seed must agree.
    # Recorded as each batch reaches the training step, in this process: dataloader workers
    # (a speed switch) collate in processes of their own, whose counters nobody would read.
    order = hashlib.sha256()
    real_training_step = trainer.training_step

    def recording_training_step(model, inputs, *args, **kwargs):
        if order_batches[0] < 32:
            order_batches[0] += 1
            order.update(json.dumps([ids[:16] for ids in batch_examples(inputs)]).encode())
        # B3: positions the model computes vs the real tokens among them (padding-free has no mask).
        computed = inputs["input_ids"].numel()
        mask = inputs.get("attention_mask")
        positions[0] += computed
        positions[1] += mask.sum() if mask is not None else computed   # a tensor: no wait for the GPU here
        return real_training_step(model, inputs, *args, **kwargs)

    order_batches = [0]
    positions = [0, 0]   # computed, non-pad
    trainer.training_step = recording_training_step

    def on_sigint(signum, frame):
        stop_flag["stop"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    resume = last_checkpoint(job.checkpoint_dir)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    finally:
        signal.signal(signal.SIGINT, previous)
    seconds = time.perf_counter() - start
    if stop_flag["stop"]:
        raise Interrupted(last_checkpoint(job.checkpoint_dir) or job.checkpoint_dir)

    eval_loss = None
    if eval_ds is not None:
        eval_loss = float(trainer.evaluate()["eval_loss"])
    peak, peak_kind = peak_memory(device)
    tokens = int(trainer.state.num_input_tokens_seen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    out = Path(job.output_dir)
    main_process = trainer.is_world_process_zero()
    # One name for every process: under FSDP all of them take part in gathering the weights.
    tmp = out.with_name(f".{out.name}.partial-{os.environ.get('MASTER_PORT', os.getpid())}")
    if main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled:
        trainer.save_model(str(tmp))   # gathers the sharded weights; writes on the main process only
    elif main_process:
        (save or (lambda m, p: m.save_pretrained(p)))(trainer.model, str(tmp))
    if main_process:
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    trainer.accelerator.wait_for_everyone()

    return TrainResult(
        kind=kind, output_dir=str(out), train_seconds=seconds, steps=int(trainer.state.global_step),
        tokens_seen=tokens, tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, trainable_parameters=int(trainable),
        total_parameters=int(total), loss_history=history, eval_loss=eval_loss,
        final_loss=history[-1]["loss"] if history else float(output.training_loss),
        examples=len(train_ds), dropped_examples=dropped, truncated_examples=truncated,
        device_name=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        versions=versions(), resumed_from=resume, step_timeline=[list(t) for t in timeline],
        data_order_sha256=order.hexdigest(), padding_efficiency=float(positions[1]) / positions[0] if positions[0] else 1.0,
        speedups=list(speedups or []), parallelism=parallelism(trainer),
        processes=trainer.args.world_size,
    )
