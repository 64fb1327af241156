"""Evaluation: text windows, perplexity, KL divergence and top-1 agreement against a base model."""
