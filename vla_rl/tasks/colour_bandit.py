"""A one-step visual-language task: "reach the red block and close the gripper".

The image shows one coloured block on the left or the right half of a grey table; the
instruction says whether to close or open the gripper at it. Success needs the first action
dimension (x) to point toward the block (only the image tells where) and the gripper dimension
to have the sign the instruction asks for (only the text tells which): 25% by chance. Solving it
shows that the policy reads both inputs and that reward reaches the log-probs of several action
tokens through the LoRA adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
GRIPPER_DIM = 6


@dataclass
class BanditBatch:
    images: torch.Tensor  # [N, 224, 224, 3] uint8
    instructions: list[str]
    block_left: torch.Tensor  # [N] bool: the block is on the left half
    close_gripper: torch.Tensor  # [N] bool: the instruction asks to close the gripper


class ColourBandit:
    """Samples observations and scores decoded actions."""

    def __init__(self, image_size: int = 224, seed: int = 0) -> None:
        self.size = image_size
        self.rng = np.random.default_rng(seed)

    def draw(self, colour: str, left: bool) -> np.ndarray:
        s = self.size
        img = np.full((s, s, 3), 200, dtype=np.uint8)  # grey table
        b = s // 4
        top = s // 2 - b // 2
        x0 = s // 8 if left else s - s // 8 - b
        img[top : top + b, x0 : x0 + b] = COLOURS[colour]
        return img

    def sample(self, n: int, group_size: int = 1) -> BanditBatch:
        """n observations; with group_size G, each distinct start is repeated G times (GRPO)."""
        if n % group_size:
            raise ValueError("n must be a multiple of group_size")
        images, texts, left, close = [], [], [], []
        for _ in range(n // group_size):
            colour = str(self.rng.choice(list(COLOURS)))
            is_left = bool(self.rng.random() < 0.5)
            is_close = bool(self.rng.random() < 0.5)
            img = self.draw(colour, is_left)
            text = f"reach the {colour} block and {'close' if is_close else 'open'} the gripper"
            for _ in range(group_size):
                images.append(img)
                texts.append(text)
                left.append(is_left)
                close.append(is_close)
        return BanditBatch(
            torch.from_numpy(np.stack(images)), texts, torch.tensor(left), torch.tensor(close)
        )

    @staticmethod
    def _parts(
        batch: BanditBatch, normalized_actions: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = np.asarray(normalized_actions)
        first = a[:, 0] if a.ndim == 3 else a  # [N, C, 7]: the first action of the chunk counts
        reach_ok = torch.from_numpy(first[:, 0] < 0) == batch.block_left
        gripper_ok = torch.from_numpy(first[:, GRIPPER_DIM] < 0) == batch.close_gripper
        return reach_ok, gripper_ok

    @classmethod
    def success(cls, batch: BanditBatch, normalized_actions: np.ndarray) -> torch.Tensor:
        """normalized_actions [N, 7] or [N, C, 7] -> success [N] (both parts right)."""
        reach_ok, gripper_ok = cls._parts(batch, normalized_actions)
        return (reach_ok & gripper_ok).float()

    @classmethod
    def reward(cls, batch: BanditBatch, normalized_actions: np.ndarray) -> torch.Tensor:
        """Dense reward [N]: 0.5 for reaching toward the block, 0.5 for the right gripper sign
        (like ManiSkill's staged dense rewards; success still needs both)."""
        reach_ok, gripper_ok = cls._parts(batch, normalized_actions)
        return 0.5 * reach_ok.float() + 0.5 * gripper_ok.float()
