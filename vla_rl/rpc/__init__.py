"""gRPC plumbing shared by the services: generated stubs (gen/), tensor conversion, server and
client helpers. Full service names come from the descriptors, so they cannot drift from the
protos."""

from vla_rl.rpc.gen.v1 import env_pb2, learner_pb2, rollout_pb2

ROLLOUT_SERVICE: str = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name
ENV_SERVICE: str = env_pb2.DESCRIPTOR.services_by_name["EnvService"].full_name
LEARNER_SERVICE: str = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name

# Sampling temperatures an ActRequest or StartCollectionRequest may ask for. Below the floor
# logits / temperature overflow to inf and the probabilities to NaN (1e-45 gave INTERNAL).
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0


def temperature_in_range(temperature: float) -> bool:
    """Whether a sampling temperature is allowed, compared as the float32 the proto carries (a
    client's 0.01 arrives as 0.0099999998). NaN is not."""
    import numpy as np

    t = np.float32(temperature)
    return bool(np.float32(MIN_TEMPERATURE) <= t <= np.float32(MAX_TEMPERATURE))


__all__ = [
    "ENV_SERVICE",
    "LEARNER_SERVICE",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "ROLLOUT_SERVICE",
    "temperature_in_range",
]
