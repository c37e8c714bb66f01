"""The Unsloth route: `FastLanguageModel` loads and patches the model (its fused kernels, its
gradient checkpointing), then the same TRL SFTTrainer settings as the PEFT route train it.

Unsloth must be imported before transformers/peft/trl in the process that uses it, which is why
every backend trains in its own subprocess (see worker.py). On a machine without a GPU Unsloth
2026.10 falls back to a CPU path built on the same libraries; the result records which ran.
"""

from __future__ import annotations

from ollama_ft.backends import TrainJob, TrainResult


class UnslothBackend:
    name = "unsloth"

    def train(self, job: TrainJob, emit) -> TrainResult:
        import unsloth  # noqa: F401  (first: it patches transformers, peft and trl on import)
        from unsloth import FastLanguageModel

        from ollama_ft.backends.common import pick_device, resolve_targets, run_sft, training_dtype

        device = pick_device(job)
        dtype = training_dtype(job.model, device)
        t = job.train
        full = t["method"] == "full"
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=job.base_path, max_seq_length=job.model["max_seq_length"], dtype=dtype,
            load_in_4bit=job.model["load_in_4bit"], full_finetuning=full,
            trust_remote_code=job.model["trust_remote_code"], local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not full:
            model = FastLanguageModel.get_peft_model(
                model, r=t["rank"], lora_alpha=t["alpha"], lora_dropout=t["dropout"],
                target_modules=resolve_targets(model, t["target_modules"]), bias="none",
                use_gradient_checkpointing="unsloth" if t["gradient_checkpointing"] else False,
                random_state=t["seed"], use_dora=t["method"] == "dora")
        emit({"event": "note", "text": f"unsloth {getattr(unsloth, '__version__', '?')} on {device}"})
        # Unsloth turns padding-free batching on by itself; measured slower with SDPA on an H100
        # (FIELD-NOTES), and off keeps the data layout identical to the PEFT route. Its own
        # checkpointing is set by get_peft_model above; passing transformers' use_reentrant=False
        # on top measured 17% slower than a bare Unsloth script (benchmarks/results, B4).
        return run_sft(job, model, tokenizer, emit, device=device, dtype=dtype,
                       kind="full" if full else "adapter",
                       config_overrides={"padding_free": False, "gradient_checkpointing_kwargs": None})
