"""gRPC plumbing shared by the services: generated stubs (gen/), tensor conversion, server and
client helpers. Full service names come from the descriptors, so they cannot drift from the
protos."""

from vla_rl.rpc.gen.v1 import env_pb2, learner_pb2, rollout_pb2

ROLLOUT_SERVICE: str = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name
ENV_SERVICE: str = env_pb2.DESCRIPTOR.services_by_name["EnvService"].full_name
LEARNER_SERVICE: str = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name

__all__ = ["ENV_SERVICE", "LEARNER_SERVICE", "ROLLOUT_SERVICE"]
