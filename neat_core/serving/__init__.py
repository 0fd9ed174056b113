"""Multi-adapter serving: every adapter (NEAT or LoRA) as low-rank factors computed once at load time
(`factors`), one frozen base model running a batch whose rows use different adapters (`batched`), a byte-bounded
adapter cache (`cache`), and the scheduler that batches concurrent requests and streams tokens (`engine`)."""

from neat_core.serving.batched import MultiAdapterLinear, MultiAdapterModel
from neat_core.serving.cache import AdapterAccessError, AdapterCache, AdapterRef
from neat_core.serving.engine import BatchEngine, EngineClosed, SamplingParams, TokenStream
from neat_core.serving.factors import AdapterFactors, load_factors

__all__ = [
    "AdapterAccessError",
    "AdapterCache",
    "AdapterFactors",
    "AdapterRef",
    "BatchEngine",
    "EngineClosed",
    "MultiAdapterLinear",
    "MultiAdapterModel",
    "SamplingParams",
    "TokenStream",
    "load_factors",
]
