"""Exports out and in: a run directory written as an export (safetensors, diffusers, ONNX), a VAE from
diffusers or an LDM checkpoint imported as one, and images sampled from a stage-two export. The file names
and the reading side of an export directory are launch/runtime/exportdir.py."""
