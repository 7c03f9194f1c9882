"""The emulator: fleet endpoints as emulated vLLM servers over real HTTP, in real time."""
