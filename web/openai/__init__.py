"""The OpenAI-compatible layer: HTTP shim (routes) → protocol models → serving logic."""
