"""Experiments on the digits world: its build, the shipped adapter chain, the protocol, its
evaluation networks and metrics, and the reward evaluation of the feedback stage. The
world's data, captions and tokenizer live in ``hypersd_core.worlds.digits``."""
