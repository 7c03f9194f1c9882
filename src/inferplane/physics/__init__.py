"""Physics: hardware and model profiles, and roofline estimates of engine step times.

Used by the placement latency predictor, the emulated vLLM engine and the offline simulator.
See ``docs/physics.md`` for the formulas, every figure's source and the validation against
published vLLM measurements.

    >>> from inferplane.physics import Roofline, get_hardware, get_model
    >>> r = Roofline(get_hardware("h100"), get_model("llama-3.1-8b"))
    >>> round(r.decode_step_time_s(1, 1024) * 1e3, 1)  # ms per token, one sequence
    8.0
"""

from inferplane.physics.errors import UnknownProfileError
from inferplane.physics.hardware import HARDWARE, HardwareKind, HardwareProfile, get_hardware
from inferplane.physics.models import MODELS, PRECISIONS, ModelProfile, Precision, get_model
from inferplane.physics.roofline import Roofline, min_tensor_parallel

__all__ = [
    "HARDWARE",
    "MODELS",
    "PRECISIONS",
    "HardwareKind",
    "HardwareProfile",
    "ModelProfile",
    "Precision",
    "Roofline",
    "UnknownProfileError",
    "get_hardware",
    "get_model",
    "min_tensor_parallel",
]
