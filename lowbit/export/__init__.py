"""Exports for other runtimes: a loaded model (float, or lowbit's quantized layers) written as a file they load.

gguf_writer.py (llama.cpp's GGUF: metadata, tensor names, block formats) · gguf_blocks.py (lowbit codes repacked
into GGUF blocks without re-rounding) · gguf_tokenizer.py (the tokenizer as GGUF metadata) · onnx_*.py (ONNX).
"""
