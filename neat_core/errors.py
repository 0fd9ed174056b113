"""The errors neat_core raises. Callers (the worker, the API) map these, and only these, to job errors or HTTP."""

from __future__ import annotations


class NeatCoreError(Exception):
    """Base class: every failure neat_core reports on purpose is one of these."""

    code = "neat_core_error"

    def __reduce__(self):
        # Pickled as (class, message, attributes), whatever the subclass's __init__ takes: a training rank's error
        # reaches its launcher as the same error (neat_core.train.distributed).
        return _rebuild, (type(self), str(self), self.__dict__)


def _rebuild(cls: type[NeatCoreError], message: str, attributes: dict) -> NeatCoreError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attributes)
    return error


class InvalidHyperparameterError(NeatCoreError, ValueError):
    """A method name, hyperparameter name or value was rejected. `field` names it; `allowed` says what would do."""

    code = "invalid_hyperparameter"

    def __init__(self, field: str, message: str, allowed: object | None = None):
        self.field = field
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed is not None:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class MethodDefinitionError(NeatCoreError):
    """A method package is malformed: no `spec.SPEC` or `model.METHOD`, or a name another package already uses.
    A deployment error (a bad `NEAT_METHOD_PACKAGES` entry), never the caller's."""

    code = "method_definition_error"


class ModelNotFoundError(NeatCoreError, LookupError):
    """A base model id resolves to nothing local. Never raised after a network wait: we never look on a hub."""

    code = "model_not_found"

    def __init__(self, model_id: str, available: list[str]):
        self.model_id = model_id
        self.available = available
        super().__init__(
            f"unknown base model {model_id!r}: not in the catalog and not a local transformers directory; "
            f"available: {', '.join(available)}"
        )


class DataFormatError(NeatCoreError, ValueError):
    """A dataset file is not in one of the supported JSONL formats. `errors` holds `{line, code, message}` rows."""

    code = "invalid_file"

    def __init__(self, message: str, errors: list[dict] | None = None):
        self.errors = errors or []
        super().__init__(message)


class CheckpointError(NeatCoreError):
    """A checkpoint is missing, incomplete or does not match the run it is resumed into."""

    code = "invalid_checkpoint"


class ArtifactError(NeatCoreError):
    """An adapter artifact directory is missing files or cannot be loaded."""

    code = "invalid_artifact"


class IncompatibleTaskError(NeatCoreError, ValueError):
    """The data's task (classification or causal LM) is not one the base model can be trained for."""

    code = "incompatible_model"


class InsufficientMemoryError(NeatCoreError):
    """A job's estimated training memory (neat_core.memory) exceeds what the worker's device has free: refused
    before the model is loaded, with the estimate in the message."""

    code = "insufficient_memory"
