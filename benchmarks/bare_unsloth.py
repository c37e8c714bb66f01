"""B4's reference: a bare Unsloth training script, as Unsloth's own notebooks write it, with the
same model, data, LoRA and trainer settings as ollama-ft's Unsloth backend. Prints nothing but
writes one JSON result.

    python -m benchmarks.bare_unsloth BASE DATA OUT STEPS MAX_LEN BATCH ACCUM OPTIM WARMUP
"""

import json
import sys
import time

import unsloth  # noqa: F401  (first, as Unsloth asks)
from unsloth import FastLanguageModel


def main(base, data, out, steps, max_len, batch, accum, optim, warmup):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ollama_ft.chat_templates import load_family

    steps, max_len, batch, accum, warmup = int(steps), int(max_len), int(batch), int(accum), int(warmup)
    model, tok = FastLanguageModel.from_pretrained(model_name=base, max_seq_length=max_len, dtype=None,
                                                   load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=42)
    tok.chat_template = load_family("chatml").jinja
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    ds = Dataset.from_list([{"text": tok.apply_chat_template(r["messages"], tokenize=False)} for r in rows])
    timeline = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            timeline.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, callbacks=[Clock()], args=SFTConfig(
        output_dir="/tmp/bare-unsloth", max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, learning_rate=2e-4, lr_scheduler_type="linear", optim=optim, seed=42,
        bf16=True, logging_steps=5, save_strategy="no", report_to=[], max_length=max_len, padding_free=False,
        include_num_input_tokens_seen="non_padding", dataset_text_field="text", disable_tqdm=True))
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    _, t0, n0 = timeline[warmup]
    _, t1, n1 = timeline[-1]
    result = {"variant": "bare-unsloth", "tokens_per_second": (n1 - n0) / (t1 - t0),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "peak_memory_kind": "cuda_allocated",
              "final_loss": float(trainer.state.log_history[-2].get("loss", float("nan"))),
              "device": torch.cuda.get_device_name(0)}
    json.dump(result, open(out, "w"), indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
