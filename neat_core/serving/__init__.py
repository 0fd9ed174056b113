"""Multi-adapter serving: every adapter (NEAT or LoRA) as low-rank factors computed once at load time
(`factors`), and one frozen base model running a batch whose rows use different adapters (`batched`)."""

from neat_core.serving.batched import MultiAdapterLinear, MultiAdapterModel
from neat_core.serving.factors import AdapterFactors, load_factors

__all__ = ["AdapterFactors", "MultiAdapterLinear", "MultiAdapterModel", "load_factors"]
