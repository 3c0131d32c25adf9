"""Distillation math and stage objectives: the noise schedule and DDIM jump, TSCD and its
LCM / TCD baselines, the adversarial term, human-feedback losses and DMD.

Pure tensor functions plus the stage classes that wire them; no I/O, no ``accelerator``,
nothing from ``training``, the app or the UI.
"""
