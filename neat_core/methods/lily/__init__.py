"""Lily: low-rank interconnected adaptation across layers (peft's LilyConfig, plus a per-sample router mode).

`spec` (torch-free), `layer` (LilyLinear, the router modes' forward, `install_routing`), `model` (`METHOD`).
This file stays empty of imports so that `neat_core.methods.lily.spec` imports without torch.
"""
