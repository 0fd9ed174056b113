"""NEAT: a tiny network reads each frozen weight and outputs its update (peft's PEANuT format).

`spec` (torch-free: hyperparameters, defaults, serving), `layer` (the factored forward), `model` (`METHOD`).
This file stays empty of imports so that `neat_core.methods.neat.spec` imports without torch.
"""
