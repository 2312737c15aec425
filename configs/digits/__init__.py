"""Digits experiment configs: 8x8 handwritten digits scored by tiny NCSN++ / DDPM++ / DDPM nets."""
