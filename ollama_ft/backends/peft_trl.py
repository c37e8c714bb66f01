"""The plain Hugging Face route: transformers loads the model, PEFT adds LoRA/DoRA, TRL trains.

QLoRA loads the frozen base in 4-bit NF4 through bitsandbytes (CUDA only) and prepares it with
`prepare_model_for_kbit_training`, which TRL does not call itself. The speed switches of
`speedups.py` (padding-free batches, hand-written LoRA backward, Triton kernels) go on per device
by measurement.
"""

from __future__ import annotations

from ollama_ft.backends import TrainJob, TrainResult
from ollama_ft.backends.common import pick_device, resolve_targets, run_sft, training_dtype
from ollama_ft.backends.speedups import TRAINER_SWITCHES, resolve_speedups, trainer_settings

KERNEL_SWITCHES = ("fused_rmsnorm", "fused_rope", "fused_swiglu")   # Triton kernels, fused_kernels.py


def soft_prompt_config(method: str, num_virtual_tokens: int):
    """PEFT's config for a prompt_tuning or p_tuning soft prompt of `num_virtual_tokens` vectors.

    Prompt tuning starts from rows sampled from the vocabulary, so its vectors begin at the scale
    of real embeddings (PEFT's default, N(0, 1) rows, is far larger than any real token's)."""
    from peft import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, TaskType

    from ollama_ft.recipe import P_TUNING_ENCODER_WIDTH

    if method == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                               encoder_hidden_size=P_TUNING_ENCODER_WIDTH)


def apply_kernel_switches(model, speedups: list[str], device: str) -> list[str]:
    """`speedups` less the Triton switches that did not apply to `model`: all of them where Triton cannot run."""
    requested = [s for s in speedups if s in KERNEL_SWITCHES]
    if not requested:
        return speedups
    from ollama_ft.kernels import fused_kernels

    applied = fused_kernels.patch_model(model, requested) if fused_kernels.available(device) else []
    return [s for s in speedups if s not in requested or s in applied]


class PeftBackend:
    name = "peft"

    def train(self, job: TrainJob, emit) -> TrainResult:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = pick_device(job)
        dtype = training_dtype(job.model, device)
        t = job.train
        load_kwargs = dict(dtype=dtype, trust_remote_code=job.model["trust_remote_code"],
                           attn_implementation="sdpa")
        if job.model["load_in_4bit"]:
            from transformers import BitsAndBytesConfig

            load_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
            load_kwargs["device_map"] = {"": 0}
        tokenizer = AutoTokenizer.from_pretrained(job.base_path, trust_remote_code=job.model["trust_remote_code"])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(t["seed"])
        model = AutoModelForCausalLM.from_pretrained(job.base_path, **load_kwargs)
        if device == "cuda" and not job.model["load_in_4bit"]:
            model = model.to("cuda")

        speedups = resolve_speedups(t.get("speedups", []), device, four_bit=job.model["load_in_4bit"])
        if not job.model["load_in_4bit"] and "no_fp32_upcast" in speedups:
            speedups.remove("no_fp32_upcast")   # only 4-bit loading upcasts
        overrides, kept = trainer_settings([s for s in speedups if s in TRAINER_SWITCHES], t, device)
        speedups = [s for s in speedups if s not in TRAINER_SWITCHES or s in kept]
        if t["method"] == "full":
            speedups = apply_kernel_switches(model, speedups, device)
            return run_sft(job, model, tokenizer, emit, device=device, dtype=dtype, kind="full",
                           config_overrides=overrides, speedups=[s for s in speedups if s != "fused_lora"])

        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if t["method"] in ("prompt_tuning", "p_tuning"):
            # PEFT prepends the prompt itself and drops position ids, so padding-free batches (which
            # pass position ids) do not apply; the other switches patch LoRA layers or the base.
            model = get_peft_model(model, soft_prompt_config(t["method"], t["num_virtual_tokens"]))
            return run_sft(job, model, tokenizer, emit, device=device, dtype=dtype, kind="soft_prompt",
                           config_overrides={"padding_free": False}, speedups=[])

        if job.model["load_in_4bit"] and "no_fp32_upcast" in speedups:
            # What prepare_model_for_kbit_training does, less its cast of every non-4-bit weight
            # (embeddings, LM head, norms) to float32: frozen weights need no float32 copy, and
            # float32 norm weights turn the whole residual stream float32. Checkpointing is
            # non-reentrant here, so the inputs need no requires_grad hook.
            for parameter in model.parameters():
                parameter.requires_grad_(False)
        elif job.model["load_in_4bit"]:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t["gradient_checkpointing"])
        config = LoraConfig(r=t["rank"], lora_alpha=t["alpha"], lora_dropout=t["dropout"],
                            target_modules=resolve_targets(model, t["target_modules"]),
                            use_dora=t["method"] == "dora", bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        if "fused_lora" in speedups:
            from ollama_ft.kernels.fast_lora import patch_peft_lora

            if patch_peft_lora(model) == 0:   # dropout, DoRA: PEFT's own layers stay
                speedups.remove("fused_lora")
        speedups = apply_kernel_switches(model, speedups, device)
        return run_sft(job, model, tokenizer, emit, device=device, dtype=dtype, kind="adapter",
                       config_overrides=overrides, speedups=speedups)
