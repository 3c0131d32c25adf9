"""Models: backbones (digits / SD1.5 / SDXL), the sampling recipes and ``generate``, LoRA
files (diffusers and kohya layouts) and adapter switching on one resident base model.

Imports nothing from ``training``, the app or the UI.
"""
