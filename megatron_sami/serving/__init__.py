"""Serving: an OpenAI-compatible HTTP server for a local HF model (``sami-serve``).
"""
