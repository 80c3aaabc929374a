"""Triton kernels, installed as `shortllm.kernels` (the top-level name `kernels` would shadow
Hugging Face's `kernels` package). Importing this package never imports triton; each kernel module
does, and the dispatcher only imports them for CUDA tensors or under TRITON_INTERPRET=1."""
