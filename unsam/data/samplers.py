"""A training sampler whose stream survives ``--resume``.

detectron2's :class:`~detectron2.data.samplers.TrainingSampler` yields the infinite stream
``shuffle(range(N)) + shuffle(range(N)) + ...`` from a seed, every rank taking
``stream[rank::world]``. After a resume at iteration ``k`` a new sampler starts that stream from
its first element again, so the first ``k`` iterations' images are seen twice and the rest of the
uninterrupted stream never. :class:`ResumableTrainingSampler` yields the same stream (identical
to detectron2's for the same seed) and can start it at iteration ``k``; its seed is a
checkpointable, so a run whose seed was drawn at random resumes the same stream too.
"""

import itertools
import logging
from typing import Dict, Iterator, Optional

import unsam.compat  # noqa: F401

import torch
from detectron2.data.samplers import TrainingSampler

logger = logging.getLogger(__name__)


def _as_ints(indices: torch.Tensor, chunk: int = 1 << 16) -> Iterator[int]:
    """The indices as Python ints, converted a chunk at a time: an epoch's ``tolist()`` at once is
    ~36 bytes per image held by every process that iterates the sampler (each loader worker:
    36 MB at a million images, 400 MB at SA-1B's 11 M); the tensor itself is 8."""
    for start in range(0, len(indices), chunk):
        yield from indices[start : start + chunk].tolist()


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's training stream, startable at any iteration.

    Args:
        size: number of images in the dataset.
        samples_per_iteration: images per iteration over all ranks (``SOLVER.IMS_PER_BATCH``):
            iteration ``k`` starts at position ``k * samples_per_iteration`` of the global stream.
        shuffle: as detectron2's sampler.
        seed: as detectron2's (``None``: a random seed shared by all ranks).
    """

    def __init__(
        self,
        size: int,
        samples_per_iteration: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
    ):
        super().__init__(size, shuffle=shuffle, seed=seed)
        if samples_per_iteration <= 0:
            raise ValueError(f"samples_per_iteration must be positive, got {samples_per_iteration}")
        self._samples_per_iteration = int(samples_per_iteration)
        self._start = 0

    @property
    def iteration(self) -> int:
        """The iteration the next ``iter()`` starts at."""
        return self._start // self._samples_per_iteration

    def set_iteration(self, iteration: int) -> None:
        """Make the next ``iter()`` continue the stream at ``iteration`` (0: from the start)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        self._start = int(iteration) * self._samples_per_iteration

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(
            self._indices_from(self._start), self._rank, None, self._world_size
        )

    def _epoch(self, generator: torch.Generator) -> torch.Tensor:
        # one call per epoch, in order: the generator's state then matches detectron2's sampler
        if self._shuffle:
            return torch.randperm(self._size, generator=generator)
        return torch.arange(self._size)

    def _indices_from(self, start: int) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self._seed)
        epochs, offset = divmod(start, self._size)
        for _ in range(epochs):  # advance the generator; O(epochs * N) once per resume
            self._epoch(generator)
        yield from _as_ints(self._epoch(generator)[offset:])
        while True:
            yield from _as_ints(self._epoch(generator))

    # checkpointable (fvcore saves/restores it with the model): the seed and what it applies to
    def state_dict(self) -> Dict:
        return {
            "seed": self._seed,
            "size": self._size,
            "shuffle": self._shuffle,
            "samples_per_iteration": self._samples_per_iteration,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Take the checkpoint's seed when the stream it describes is this one.

        A dataset of another size or another batch size is another stream: the seed would not
        give the uninterrupted order back, so it is kept as is, with a warning.
        """
        same = (
            int(state.get("size", -1)) == self._size
            and bool(state.get("shuffle")) == self._shuffle
            and int(state.get("samples_per_iteration", -1)) == self._samples_per_iteration
        )
        if not same:
            logger.warning(
                "training sampler: the checkpoint's data stream was for %s images, batch %s; "
                "this run has %d images, batch %d: the data order restarts from its seed",
                state.get("size"),
                state.get("samples_per_iteration"),
                self._size,
                self._samples_per_iteration,
            )
            return
        self._seed = int(state["seed"])
