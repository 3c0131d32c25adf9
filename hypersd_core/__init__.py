"""Hyper-SD Studio's library.

Layers, imports pointing down only::

    cli, app (support for the UI)       command line, model service
    training, study, bench, evaluation  runs, votes, measurements
    digits, rewards                     the digits world, reward models
    models, distill                     backbones, recipes, LoRA I/O; distillation math
"""
