"""The emulated vLLM engine: scheduler, KV block pool and step timing, on any clock."""
