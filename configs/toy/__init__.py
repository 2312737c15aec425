"""Toy experiment configs: closed-form mixtures scored by a small MLP."""
