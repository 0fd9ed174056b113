"""HEAT: LoRA on the attention heads a first-order Taylor score ranks highest (a reconstruction).

`spec` (torch-free), `heads` (attention blocks, head scores, selection, gradient masks), `model` (`METHOD`).
This file stays empty of imports so that `neat_core.methods.heat.spec` imports without torch.
"""
