"""Where the randomness of sampling and noise comes from.

Reproducible (default): a ``torch.Generator`` seeded by the user, or from torch's default
generator (so ``torch.manual_seed`` makes a run repeatable). Without a seed, the seed is drawn
at the source's first draw, not when it is made: ``torch.manual_seed`` called after
``make_private`` (as Opacus users do) still decides the run. Not a secret: anyone who knows the
seed can recompute the sample and the noise.

Secure mode: every privacy-relevant draw (Poisson batch sizes, the subsets, the Gaussian noise)
is computed from bytes of a cryptographically secure generator, never from a torch.Generator
(whose CPU Mersenne Twister keeps only 32 bits of a seed):

* on one process, the operating system's CSPRNG (``os.urandom``: getrandom(2) on Linux) for
  every draw;
* for the batch-size stream that all ranks must share, SHAKE-256 keyed with 256 bits that rank 0
  takes from the OS and broadcasts once (``RandomSource(key=...)``): a standard extendable-output
  function used as a stream cipher, so an adversary who does not know the key cannot predict
  or reproduce it. Nothing of either is stored in checkpoints.

Uniforms are 53-bit (k / 2^53); normals come from the Box-Muller transform of two of them in
float64; Binomial(n, q) is the sum of n Bernoulli(q) draws (exact, n uniforms); a uniform
permutation is the argsort of independent 64-bit keys (ties, which would bias it, have
probability below n^2 / 2^65). docs/security.md has the threat model.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from torch import Tensor

KEY_BYTES = 32  # 256-bit keys for the shared secure stream
_CHUNK = 1 << 22  # uniforms per urandom call when drawing Bernoulli sums


class RandomSource:
    """The source of one stream of sampling or noise randomness; see the module docstring.

    Args:
        seed: seed of the reproducible generator (default: drawn from torch's default one at
            the first draw).
        seed_from: where that default seed comes from instead (a callable returning an int,
            e.g. another source's ``seed``), also at the first draw.
        secure: draw from the OS CSPRNG instead (no seed, no generator, no state).
        device: device of the reproducible generator.
        generator: the user's ``torch.Generator`` to draw from (reproducible mode only).
        key: secure mode with a keyed SHAKE-256 stream (bytes, at least 16); used for the
            stream all ranks share.
    """

    def __init__(
        self,
        seed: int | None = None,
        secure: bool = False,
        device="cpu",
        generator: torch.Generator | None = None,
        key: bytes | None = None,
        seed_from=None,
    ):
        secure = secure or key is not None
        if secure and (seed is not None or generator is not None):
            raise ValueError(
                "secure_mode draws from the OS CSPRNG; do not also give a seed or generator"
            )
        if key is not None and len(key) < 16:
            raise ValueError(f"a secure stream key needs at least 128 bits, got {8 * len(key)}")
        self.secure = secure
        self._key, self._counter = key, 0
        self._generator: torch.Generator | None = None
        self._seed_from = None  # set while the seed is still to be drawn
        if secure:
            return
        if generator is not None:
            self._generator = generator  # the user's, in the state the user left it
            return
        self._generator = torch.Generator(device=device)
        if seed is None:
            # From torch's default generator at the first draw, so that torch.manual_seed
            # (before or after make_private) makes a run repeatable.
            self._seed_from = seed_from or (lambda: int(torch.randint(2**62, ())))
        else:
            self._generator.manual_seed(seed)

    @property
    def generator(self) -> torch.Generator | None:
        """The reproducible generator (seeded now if its seed was still to be drawn); None in
        secure mode."""
        if self._seed_from is not None:
            seed_from, self._seed_from = self._seed_from, None
            self._generator.manual_seed(seed_from())
        return self._generator

    # ------------------------------------------------------------------ secure bytes

    def random_bytes(self, count: int) -> bytes:
        """``count`` bytes of the secure stream (secure mode only)."""
        if not self.secure:
            raise RuntimeError("random_bytes is the secure stream; this source is reproducible")
        if self._key is None:
            return os.urandom(count)
        block = hashlib.shake_256(self._key + self._counter.to_bytes(8, "little"))
        self._counter += 1
        return block.digest(count)

    def _words(self, count: int) -> np.ndarray:
        """``count`` uniformly random uint64 words of the secure stream."""
        return np.frombuffer(self.random_bytes(8 * count), dtype=np.uint64)

    def _uniforms(self, count: int) -> np.ndarray:
        """``count`` float64 uniforms k / 2^53 in [0, 1) from the secure stream."""
        return (self._words(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    # ------------------------------------------------------------------ draws

    def binomial(self, count: Tensor, prob: Tensor) -> Tensor:
        """Binomial(count, prob) elementwise, as torch.binomial (float in, float out)."""
        if not self.secure:
            return torch.binomial(count, prob, generator=self.generator)
        out = torch.empty_like(count)
        flat_count, flat_prob, flat_out = count.reshape(-1), prob.reshape(-1), out.view(-1)
        for k in range(flat_count.numel()):
            n, q, hits = int(flat_count[k]), float(flat_prob[k]), 0
            for start in range(0, n, _CHUNK):
                hits += int((self._uniforms(min(_CHUNK, n - start)) < q).sum())
            flat_out[k] = hits
        return out

    def randperm(self, n: int) -> Tensor:
        """A uniformly random permutation of range(n) (int64)."""
        if not self.secure:
            return torch.randperm(n, generator=self.generator)
        keys = self._words(n).view(np.int64)
        return torch.from_numpy(np.argsort(keys, kind="stable").astype(np.int64))

    def seed(self) -> int:
        """A 62-bit integer (e.g. to seed a derived reproducible source)."""
        if self.secure:
            return int(self._words(1)[0] >> np.uint64(2))
        return int(torch.randint(2**62, (), generator=self.generator))

    def normal(self, count: int) -> Tensor:
        """``count`` standard normals in float64 on the CPU (secure mode): Box-Muller of
        53-bit uniforms, u_1 in (0, 1] so that its log is finite."""
        pairs = math.ceil(count / 2)
        u = self._uniforms(2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u_1 in (0, 1]
        angle = 2.0 * math.pi * u[1]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return torch.from_numpy(z)

    def draw(self) -> torch.Generator:
        """The reproducible generator, for torch functions that take one."""
        if self.secure:
            raise RuntimeError(
                "a secure source has no torch.Generator; use its binomial, randperm and normal"
            )
        return self.generator

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The generator state (nothing in secure mode: it must not be reproducible)."""
        return {} if self.secure else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not self.secure and "generator" in state:
            self._seed_from = None  # the saved state replaces the seed still to be drawn
            self._generator.set_state(state["generator"])


def add_secure_noise_(grads: list[Tensor], std: float, scale: float, source: RandomSource):
    """g <- (g + std * z) * scale with z ~ N(0, I) from the secure ``source`` (float64 normals
    drawn on the CPU, moved to each tensor's device), for every tensor in ``grads``."""
    for g in grads:
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        z = source.normal(g.numel()).reshape(g.shape).to(device=g.device, dtype=acc)
        g.copy_((g.to(acc) + std * z) * scale)
