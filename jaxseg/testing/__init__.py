"""Test and benchmark support: PyTorch references written from the official code (`references/`), their
official training loops next to jaxseg's train step (`train_parity`) and the guard that makes timm /
transformers importable next to a CUDA torchvision build (`torch_guard`). Only
tests and benchmarks import this package; it needs the `test` extra (torch, timm, transformers)."""
