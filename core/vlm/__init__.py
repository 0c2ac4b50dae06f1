"""PrFlashAttention (block-sparse attention) and SAQ (staircase KV-cache quantization).

Depends on torch and transformers only, so this folder runs alone on a GPU machine.
"""
