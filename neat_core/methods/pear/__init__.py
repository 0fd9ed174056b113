"""Pear: prune and share adapters — LoRA whose least important positions, after a warm-up, share a kept one.

`spec` (torch-free), `layer` (PearLinear, PearConfig, choosing and applying the pruning), `model` (`METHOD`).
This file stays empty of imports so that `neat_core.methods.pear.spec` imports without torch.
"""
