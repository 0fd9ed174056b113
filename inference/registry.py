"""The adapters this server may serve, by name: vLLM's dynamic adapter protocol (`load_lora_adapter` /
`unload_lora_adapter`). The API loads an adapter with the artifact location its records hold before it routes the
first request for it here; a request naming a model that is neither loaded nor a base model answers 404 (as vLLM
does), which tells the API to load it again (after a restart of this server, say). Registered base models
(control.models) are told the same way, with their directory: `load_base_model`, or an adapter's
`base_model_path`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from inference.errors import ServingError, UnknownModel, WrongEndpoint
from inference.host import ModelHost, ModelRef
from neat_core.models.catalog import CAUSAL_LM, CLASSIFICATION, entry

log = logging.getLogger("inference.registry")


class AdapterRegistry:
    def __init__(self, host: ModelHost):
        self._host = host
        self._adapters: dict[str, ModelRef] = {}
        self._bases: dict[str, Path] = {}  # registered base model -> its directory, as the API told it
        self._lock = threading.Lock()

    def load_base(self, name: str, path: str | Path) -> None:
        """A registered base model's directory; it loads on its first request."""
        with self._lock:
            self._bases[name] = Path(path)

    def load(self, name: str, path: str | Path, owner: str | None = None, base_path: str | None = None) -> ModelRef:
        """Register the artifact at `path` under `name` and load it (warm for its first request). Its base model,
        task and method are the artifact's manifest's (`base_path`: where that base loads from, when registered).
        Loading a name again with the same artifact is a no-op."""
        from neat_core.artifacts import read_manifest
        from neat_core.errors import ArtifactError

        path = Path(path)
        with self._lock:
            known = self._adapters.get(name)
        if known is not None and known.artifact_dir == path and known.owner == owner:
            return known
        try:
            manifest = read_manifest(path)
            ref = ModelRef(name, manifest["task"], manifest["base_model"], path, owner, manifest.get("method"),
                           base_dir=Path(base_path) if base_path else None)  # fmt: skip
        except (ArtifactError, KeyError) as e:
            log.warning("cannot load adapter %s from %s: %s", name, path, e)
            raise ServingError(f"The model '{name}' could not be loaded.") from e
        self._host.preload(ref)
        with self._lock:
            self._adapters[name] = ref
        log.info("loaded adapter %s (%s on %s)", name, ref.method, ref.base_model)
        return ref

    def unload(self, name: str) -> None:
        with self._lock:
            ref = self._adapters.pop(name, None)
        if ref is None:
            raise UnknownModel(name)
        self._host.evict(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def resolve(self, name: str, task: str) -> ModelRef:
        """The model a request names: a loaded adapter, or a base model, catalog or registered (generation only)."""
        with self._lock:
            ref = self._adapters.get(name)
            base_dir = self._bases.get(name)
        if ref is None and base_dir is not None:  # the API checked it generates before sending it here
            ref = ModelRef(name, CAUSAL_LM, name, base_dir=base_dir)
        if ref is None:
            base = entry(name)
            if base is None:
                raise UnknownModel(name)
            ref = ModelRef(name, CAUSAL_LM, name)
            if CAUSAL_LM not in base.tasks:
                message = f"The model '{name}' is a text encoder; fine-tune it for classification, then use the result"
                raise WrongEndpoint(f"{message} with /v1/classifications.", param="model")
        if ref.task != task:
            if ref.task == CLASSIFICATION:
                message = f"The model '{name}' is a classification model; use it with /v1/classifications."
            else:
                message = f"The model '{name}' is a text-generation model; use it with /v1/chat/completions."
            raise WrongEndpoint(message, param="model")
        return ref
