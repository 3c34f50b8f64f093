"""User task modules for test_env_pool: PickCube variants under new ids, with instructions."""

import torch
from mani_skill.envs.tasks.tabletop.pick_cube import PickCubeEnv
from mani_skill.utils.registration import register_env

from services.env_server.tasks import register_task

TEST_TASK_ID = "TestPickCube-v1"
TEST_INSTRUCTION = "pick up the red test cube"
ALWAYS_SUCCESS_TASK_ID = "TestAlwaysSuccess-v1"


@register_env(TEST_TASK_ID, max_episode_steps=20)
class TestPickCubeEnv(PickCubeEnv):
    """PickCube with a shorter default time limit (so the registry's default is visible)."""


@register_env(ALWAYS_SUCCESS_TASK_ID, max_episode_steps=20)
class AlwaysSuccessEnv(PickCubeEnv):
    """Reports success at every step: shows how success, terminated and truncated relate."""

    def evaluate(self):
        info = super().evaluate()
        info["success"] = torch.ones_like(info["success"])
        return info


register_task(TEST_TASK_ID, TEST_INSTRUCTION)
register_task(ALWAYS_SUCCESS_TASK_ID, "succeed at once")
