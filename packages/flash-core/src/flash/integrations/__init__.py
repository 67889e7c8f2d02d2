"""Adapters that plug flash into other libraries.

* :mod:`flash.integrations.transformers`: an attention backend for Hugging Face transformers.

Each adapter imports its library only when it is itself imported; ``import flash`` imports none.
"""
