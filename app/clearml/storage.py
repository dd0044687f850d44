"""Model downloads through ClearML: a model ID from the model registry, or a URL via the storage manager."""

from __future__ import annotations

from typing import Any


class ClearMLStorage:
    """The `RemoteStore` model_source fetches ClearML model IDs and remote URLs through."""

    def model_copy(self, model_id: str) -> str | None:
        return clearml_model_copy(model_id)

    def url_copy(self, url: str) -> str | None:
        return storage_copy(url)


def clearml_model_copy(model_id: str) -> str | None:
    """Download a ClearML model's file (no archive extraction) into ClearML's cache."""
    from clearml import InputModel

    model: Any
    try:
        model = InputModel(model_id=model_id)
        uri = model.url
    except AttributeError:
        # The SDK logs the server's refusal and then fails on the missing record.
        raise ValueError(f"no readable ClearML model with ID {model_id}") from None
    if not uri:
        raise ValueError(f"ClearML model {model_id} has no file (empty URI)")
    path = model.get_local_copy(extract_archive=False)
    return str(path) if path else None


def storage_copy(url: str) -> str | None:
    """A local copy of an http(s)/s3/gs/azure URL through ClearML's storage manager (cached)."""
    from clearml import StorageManager

    path = StorageManager.get_local_copy(url, extract_archive=False)
    return str(path) if path else None
