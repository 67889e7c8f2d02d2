"""flash as an attention backend of Hugging Face transformers (5.4 or newer)::

    import flash.integrations.transformers as flash_hf
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=flash_hf.NAME)

Importing this module registers :func:`~.attention.attention_forward` with transformers'
``AttentionInterface`` and :func:`~.mask.padding_mask` with its ``AttentionMaskInterface`` under
:data:`NAME`; :func:`register` does it again (harmlessly) and returns the name.

The name contains no ``"flash"``: transformers reads any implementation name containing it as a
request for flash-attn (or a flash kernel from the Hugging Face hub) and tries to import or download
one, and it keys other flash-attn-only behaviour on the same substring.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from flash.integrations.transformers.attention import CallRecord, attention_forward, record_calls
from flash.integrations.transformers.mask import padding_mask

__all__ = ["NAME", "CallRecord", "attention_forward", "padding_mask", "record_calls", "register"]

#: The ``attn_implementation`` under which flash is registered.
NAME = "fa_core"


def register() -> str:
    """Register flash with transformers under :data:`NAME` (idempotent) and return the name."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
    return NAME


register()
