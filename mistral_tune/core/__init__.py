"""Torch-free basics every layer uses: errors, secret redaction, logging, file helpers, process facts."""
