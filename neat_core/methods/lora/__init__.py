"""LoRA, the baseline: peft's implementation as is.

`spec` (torch-free), `model` (`METHOD`; peft's own LoRA layers). This file stays empty of imports so that
`neat_core.methods.lora.spec` imports without torch.
"""
