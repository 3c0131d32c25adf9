"""The digits world: a miniature Stable Diffusion on scikit-learn's digits (data, captions,
tokenizer), its build, the shipped adapter chain, its evaluation networks and metrics."""
