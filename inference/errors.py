"""The inference tier's errors. Each carries the HTTP status and OpenAI error code it answers with; `server`
turns them into responses and `inprocess` into the API's `BackendError`, each in one place."""

from __future__ import annotations


class InferenceError(Exception):
    status = 500
    code = "model_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.param = param


class Unauthorized(InferenceError):
    """A request without the internal token."""

    status = 401
    code = "invalid_api_key"


class PromptError(InferenceError):
    """The request cannot be run on this model (the caller's fault)."""

    status = 400
    code = "invalid_prompt"


class WrongEndpoint(InferenceError):
    """The model exists but serves the other task (a classifier asked to chat, or the reverse)."""

    status = 400
    code = "invalid_model_for_endpoint"


class UnknownModel(InferenceError):
    """No such model here: neither a catalog base model nor a loaded adapter. vLLM answers 404 too."""

    status = 404
    code = "model_not_found"

    def __init__(self, name: str):
        super().__init__(f"The model '{name}' does not exist.", param="model")
        self.name = name


class AdapterLoadError(InferenceError):
    """A load_lora_adapter request that cannot be honoured (no artifact at that location)."""

    status = 400
    code = "invalid_adapter"


class ServingError(InferenceError):
    """A model could not be loaded or run: the server's fault, whatever the low-level cause (chained)."""

    status = 500
    code = "model_error"


class Overloaded(InferenceError):
    """The caller already has as much work waiting in the engine as one caller may (its fair share of the queue):
    retry once some of it is done. Other organisations' requests are unaffected."""

    status = 429
    code = "engine_busy"
    retry_after = 1
