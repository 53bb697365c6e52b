"""OCI registries (the distribution API) as a place to read images from and push them to.

    client.py (references, URLs, requests and error messages),
    auth.py (credentials files, Basic and Bearer token auth as a requests hook),
    store.py (RegistryStore for imageref, RegistryDestination for `lazyfs push`).

Imported only for oci:// references (imageref's opener table names `open_registry_store`).
"""

from lazyfs.registry.client import RegistryName, parse_registry_reference
from lazyfs.registry.store import RegistryDestination, RegistryStore, open_registry_store

__all__ = ["RegistryDestination", "RegistryName", "RegistryStore", "open_registry_store",
           "parse_registry_reference"]
