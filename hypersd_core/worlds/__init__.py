"""The miniature worlds' data: images, captions, ground truth and tokenizers.

Low in the layering: training, rewards and evaluation read it; the experiments on each world
(``hypersd_core.digits``, ``hypersd_core.scenes``) sit above and drive training.
"""
