"""Noise-conditional classifiers of classifier guidance (training.objective = 'classifier')."""
