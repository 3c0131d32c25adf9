"""Hyper-SD Studio's library.

Layers, imports pointing down only::

    cli, app (support for the UI)       command line, model service
    training, study, bench, evaluation  runs, votes, measurements
    digits, scenes                      experiments on the miniature worlds
    rewards, worlds                     reward models; the worlds' data and captions
    models, distill                     backbones, recipes, LoRA I/O; distillation math
"""
