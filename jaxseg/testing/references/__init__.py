"""PyTorch references with random weights and tiny sizes, written from the official implementations, for
parity tests and side-by-side benchmarks: `timm_vit` (timm ViTs and relative-error helpers), `weaktr`
(hustvl/WeakTr stage 1), `segmenter` (Segmenter decoders and WeakTr's gradient-clipping loss)."""
