"""Trace loading (Mooncake, Azure) and the prompt text built from trace block ids."""
