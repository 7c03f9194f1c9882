"""The batch lane: OpenAI-compatible Files and Batch APIs, run on spare capacity."""
