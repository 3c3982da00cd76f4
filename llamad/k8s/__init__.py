"""Kubernetes scale-from-zero: decisions (``decide``), and later the API client, caches and service."""
