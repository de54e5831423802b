"""The lab: study files -> jobs -> catalog -> measures -> reports."""

from voidprompt.lab.sizes import aspect512, nai_buckets

__all__ = ["aspect512", "nai_buckets"]
