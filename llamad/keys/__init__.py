"""API keys: the keys files, each key's policy and token use, the access log, and ``llamad keys``."""
