"""Where the randomness of sampling and noise comes from.

Reproducible (default): a ``torch.Generator`` seeded by the user, or from torch's default
generator (so ``torch.manual_seed`` makes a run repeatable).
Secure mode: before every draw the generator is re-seeded with 64 bits from the operating
system's CSPRNG (``secrets``), so the sample and the noise cannot be reproduced or predicted from
anything stored (checkpoints hold no seed). See docs/privacy_engine.md for the threat model.
"""

from __future__ import annotations

import secrets

import torch


class RandomSource:
    """A torch.Generator on ``device`` (or the user's ``generator``); ``draw()`` returns it ready
    for one draw."""

    def __init__(
        self,
        seed: int | None = None,
        secure: bool = False,
        device="cpu",
        generator: torch.Generator | None = None,
    ):
        if secure and (seed is not None or generator is not None):
            raise ValueError(
                "secure_mode draws its seeds from the OS; do not also give a seed or generator"
            )
        self.secure = secure
        if generator is not None:
            self.generator = generator  # the user's, in the state the user left it
            return
        if seed is None:
            # From torch's default generator, so that torch.manual_seed makes a run repeatable.
            seed = secrets.randbits(63) if secure else int(torch.randint(2**62, ()))
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def draw(self) -> torch.Generator:
        if self.secure:
            self.generator.manual_seed(secrets.randbits(63))
        return self.generator

    def state_dict(self) -> dict:
        """The generator state (nothing in secure mode: it must not be reproducible)."""
        return {} if self.secure else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not self.secure and "generator" in state:
            self.generator.set_state(state["generator"])
