"""ollama-ft's own training kernels, switched on by the PEFT backend's speedups (backends/speedups.py):
a hand-written LoRA backward (fast_lora), the LM head fused with cross-entropy (fused_ce), and
Triton RMSNorm, rotary and SwiGLU (fused_kernels). Each is checked against the code it replaces."""
