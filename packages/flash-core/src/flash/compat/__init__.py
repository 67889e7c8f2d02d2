"""Other libraries' attention APIs, implemented with :func:`flash.attention`.

* :mod:`flash.compat.flash_attn`: the public functions of flash-attn 2.x.

Nothing here is imported by ``import flash``.
"""
