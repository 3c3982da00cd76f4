"""The KV cache kept across unload, swap and restart: a model's slots saved to disk before llamad stops its
child, and restored into the next child before its first request.

``fingerprint`` (what a saved file is valid for), ``policy`` (what to restore, keep, delete: no I/O),
``disk`` (the files, blocking), ``store`` (every model's files, in threads, and the disk bound),
``slots`` (llama-server's slot API), ``http`` (that API over HTTP), ``cache`` (one model's
:class:`~llamad.kv.cache.KVCache`, which the supervisor calls).
"""
