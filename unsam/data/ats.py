"""ATS — the adaptive task sampler.

Training draws *cells* ``(image, task)``: ``task`` is one entry of a :class:`TaskSpace`
(``whole`` image segmentation, or a ``point`` / ``box`` / ``mask`` prompt task, optionally times a
granularity level). A :class:`DifficultyTable` keeps an EMA of how hard each cell was; the
:class:`AdaptiveTaskSampler` draws cells uniformly before ``UNSAM.ATS.START_ITER`` and from

    p = (1 - beta) * w / sum(w) + beta / M,    w = (difficulty + eps) ** alpha,    M = #cells

afterwards, so hard cells come more often while every cell keeps at least ``beta / M``.

Stream and distribution
-----------------------
Like detectron2's ``TrainingSampler`` the sampler is infinite and every rank reads one shared
stream: rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...``. The stream is cut into blocks of
``block_size * W`` items; block ``b`` is produced from a counter-based seed ``(seed, b)`` —
there is no hidden generator state, the counters *are* the RNG state. Uniform blocks are
consecutive slices of per-epoch permutations of all cells (every cell exactly once per epoch,
across all ranks); adaptive blocks are drawn with replacement from ``p`` (a hard cell may repeat
by design). Ranks therefore read disjoint positions of one stream and no position is duplicated
or dropped, provided every rank builds block ``b`` from the same table, which holds because the
table only changes in :meth:`DifficultyTable.sync` (identical result on every rank) and ranks
run in lockstep (same batch size, same loader prefetch depth).

Sized for SA-1B (millions of images × tasks): a uniform item costs O(1) (the epoch's
permutation is evaluated per position, never stored), an adaptive one O(log cells) (a sum tree
the table keeps up to date), and the state is ~6 bytes per cell (float32 difficulty, seen flag,
the tree): nothing per block is as large as the table.

Integration contract (what the trainer hook does)
-------------------------------------------------
::

    table = DifficultyTable(num_images, len(task_space), ema=cfg.UNSAM.ATS.EMA)
    sampler = AdaptiveTaskSampler(table, task_space, start_iter=..., alpha=..., beta=..., eps=...)
    loader = build_ats_train_loader(TaskMapDataset(dicts, mapper, task_space), sampler,
                                    batch_size_per_rank, num_workers)
    # each batch element carries "ats_index" and "ats_task_id"
    # after every training step `it` (0-based):
    table.update(indices, task_ids, difficulties)   # this rank's samples, e.g. loss or 1 - IoU
    if (it + 1) % SYNC_PERIOD == 0: table.sync()    # collective: call on every rank
    sampler.set_iteration(it + 1)                   # number of completed iterations
    # checkpoint: sampler.state_dict() / load_state_dict() (includes the table)

* The sampler must be iterated in the main process (``DataLoader(batch_sampler=...)``, which
  :func:`build_ats_train_loader` builds). detectron2's ``build_batch_data_loader`` wraps samplers
  in ``ToIterableDataset``, which copies them into every worker, where table updates would never
  arrive — the sampler raises in that case.
* Exact resume: with ``items_per_iteration`` set (the loader builder sets it), ``set_iteration``
  marks what training has consumed, the state keeps the blocks drawn ahead by the loader's
  prefetching, and a restored sampler replays exactly the batches the uninterrupted run would have
  trained on next. Call ``sync()`` before saving (pending, un-synced updates are not saved), and
  load the state before the loader's iterator starts (or re-create that iterator afterwards: items
  already prefetched by an earlier iterator cannot be recalled).
"""

import logging
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, Sampler, get_worker_info

from ..tasks import PROMPT_TASKS, WHOLE_TASK
from ..utils.dist import all_gather_varlen, is_initialized, rank_and_world, shared_random_seed

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSpace",
    "DifficultyTable",
    "AdaptiveTaskSampler",
    "TaskMapDataset",
    "build_ats_sampler",
    "build_ats_train_loader",
]


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpace:
    """The task axis of the (image, task) grid: ``task_id`` → ``(name, level)``.

    ``level == -1`` means "any granularity" (always so for ``whole``, and for prompt tasks when
    there is no level dimension).
    """

    tasks: Tuple[Tuple[str, int], ...]

    @classmethod
    def build(cls, task_names: Sequence[str], num_levels: int = 1) -> "TaskSpace":
        """``whole`` → one task; a prompt task → ``num_levels`` tasks if ``num_levels > 1``."""
        if not task_names:
            raise ValueError("UNSAM.ATS.TASKS is empty")
        if num_levels < 1:
            raise ValueError(f"UNSAM.ATS.NUM_LEVELS must be >= 1, got {num_levels}")
        tasks: List[Tuple[str, int]] = []
        for name in task_names:
            if name != WHOLE_TASK and name not in PROMPT_TASKS:
                raise ValueError(
                    f"UNSAM.ATS.TASKS: unknown task {name!r} (known: {WHOLE_TASK}, {PROMPT_TASKS})"
                )
            if name == WHOLE_TASK or num_levels == 1:
                tasks.append((name, -1))
            else:
                tasks.extend((name, lvl) for lvl in range(num_levels))
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"UNSAM.ATS.TASKS has duplicates: {list(task_names)}")
        return cls(tuple(tasks))

    def __len__(self) -> int:
        return len(self.tasks)

    def name(self, task_id: int) -> str:
        return self.tasks[task_id][0]

    def level(self, task_id: int) -> int:
        return self.tasks[task_id][1]

    def index(self, name: str, level: int = -1) -> int:
        return self.tasks.index((name, level))


# ---------------------------------------------------------------------------------------------
# difficulty table
# ---------------------------------------------------------------------------------------------
# cells per leaf of the sampling tree: a draw descends log2(cells / LEAF_CELLS) levels, then
# scans one leaf's cells; sums are kept per leaf, so memory for the tree is ~0.5 byte per cell
LEAF_CELLS = 64
_REBUILD_CHUNK = 1 << 20  # cells per step of a full rebuild (bounds its temporary memory)


class DifficultyTable:
    """EMA of the difficulty of every (image, task) cell, consistent across ranks.

    :meth:`update` only records observations locally; :meth:`sync` gathers every rank's records
    (sparse all-gather: cost grows with the batch, not the table), averages repeated observations
    of a cell, and applies ``value = ema * value + (1 - ema) * mean`` (a cell's first observation
    is taken as is). All ranks apply the same records in the same order on CPU, so their tables
    stay bit-identical. Without ``torch.distributed`` :meth:`sync` applies the local records.

    Sized for SA-1B: the state is 5 bytes per cell (float32 value, bool seen; 15 MB for 1 M images
    × 3 tasks), and drawing from the adaptive distribution (:meth:`draw`) costs O(log cells) per
    item: a sum tree over leaves of ``LEAF_CELLS`` cells (seen cells' weights and the number of
    unseen cells per subtree, ~0.6 byte per cell) is updated for the cells a :meth:`sync` changes
    and rebuilt only when the table was replaced or written to from outside (``values`` /
    ``seen`` are plain tensors: their version counters tell).

    Attributes:
        values: float32 tensor ``num_images × num_tasks``.
        seen: bool tensor, cells observed at least once.
        version: number of syncs that changed the table.
    """

    def __init__(self, num_images: int, num_tasks: int, ema: float = 0.9):
        if num_images <= 0 or num_tasks <= 0:
            raise ValueError(f"DifficultyTable needs a non-empty grid: {num_images}×{num_tasks}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"UNSAM.ATS.EMA must be in [0, 1), got {ema}")
        self.num_images = int(num_images)
        self.num_tasks = int(num_tasks)
        self.ema = float(ema)
        self.values = torch.zeros(self.num_images, self.num_tasks, dtype=torch.float32)
        self.seen = torch.zeros(self.num_images, self.num_tasks, dtype=torch.bool)
        self.version = 0
        self._pending_cells: List[torch.Tensor] = []
        self._pending_values: List[torch.Tensor] = []
        self._tree: Optional[Dict] = None  # the sampling tree (derived; not part of the state)

    @property
    def num_cells(self) -> int:
        return self.num_images * self.num_tasks

    def state_bytes(self) -> int:
        """Bytes this table holds: values, seen flags and the sampling tree (when built)."""
        n = self.values.element_size() * self.values.numel() + self.seen.numel()
        if self._tree is not None:
            n += sum(a.nbytes for a in (self._tree["w"], self._tree["u"], self._tree["d"]))
        return n

    def update(self, indices, tasks, difficulties) -> None:
        """Record this rank's observations (applied at the next :meth:`sync`).

        Args:
            indices: N image indices (LongTensor / sequence of int).
            tasks: N task ids, or one int for all.
            difficulties: N floats (e.g. per-sample loss, or 1 - matched IoU); non-finite values
                are dropped with a warning.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        tsk = torch.as_tensor(tasks, dtype=torch.int64).reshape(-1).cpu()
        if tsk.numel() == 1 and idx.numel() != 1:
            tsk = tsk.expand(idx.numel())
        val = torch.as_tensor(difficulties).detach().reshape(-1).to("cpu", torch.float64)
        if not (idx.numel() == tsk.numel() == val.numel()):
            raise ValueError(
                f"update: {idx.numel()} indices, {tsk.numel()} tasks, {val.numel()} difficulties"
            )
        if idx.numel() == 0:
            return
        if idx.min() < 0 or idx.max() >= self.num_images:
            raise IndexError(f"image index out of range [0, {self.num_images})")
        if tsk.min() < 0 or tsk.max() >= self.num_tasks:
            raise IndexError(f"task id out of range [0, {self.num_tasks})")
        finite = torch.isfinite(val)
        if not bool(finite.all()):
            logger.warning("ATS: dropping %d non-finite difficulties", int((~finite).sum()))
            idx, tsk, val = idx[finite], tsk[finite], val[finite]
        self._pending_cells.append(idx * self.num_tasks + tsk)
        self._pending_values.append(val)

    def sync(self) -> int:
        """Apply every rank's pending records (collective when distributed).

        Returns the number of cells changed.
        """
        cells = torch.cat(self._pending_cells + [torch.zeros(0, dtype=torch.int64)])
        vals = torch.cat(self._pending_values + [torch.zeros(0, dtype=torch.float64)])
        self._pending_cells, self._pending_values = [], []
        if is_initialized() and dist.get_world_size() > 1:
            cells = all_gather_varlen(cells)
            vals = all_gather_varlen(vals)
        if cells.numel() == 0:
            return 0
        tree_current = self._tree_is_current()
        uniq, inverse = torch.unique(cells, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, vals)
        counts = torch.bincount(inverse, minlength=uniq.numel()).to(torch.float64)
        mean = sums / counts
        flat_v = self.values.view(-1)
        flat_s = self.seen.view(-1)
        old = flat_v[uniq].to(torch.float64)
        flat_v[uniq] = torch.where(flat_s[uniq], self.ema * old + (1.0 - self.ema) * mean, mean).to(
            flat_v.dtype
        )
        flat_s[uniq] = True
        self.version += 1
        if tree_current:  # the tree follows: only the leaves of the changed cells are recomputed
            self._refresh_leaves(np.unique(uniq.numpy() // LEAF_CELLS))
        return int(uniq.numel())

    # ---- adaptive distribution ------------------------------------------------------------------
    def _weights(
        self, cells: np.ndarray, alpha: float, eps: float
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weight of each seen cell (0 where unseen), seen flags, clamped difficulty) of
        ``cells``."""
        flat_v = self.values.view(-1).numpy()
        flat_s = self.seen.view(-1).numpy()
        seen = flat_s[cells]
        d = np.maximum(flat_v[cells].astype(np.float64), 0.0)
        w = np.where(seen, np.power(d + eps, alpha), 0.0)
        return w, seen, np.where(seen, d, 0.0)

    def _tree_key(self, alpha: float, eps: float):
        return (
            id(self.values),
            self.values._version,
            id(self.seen),
            self.seen._version,
            alpha,
            eps,
        )

    def _tree_is_current(self) -> bool:
        t = self._tree
        return t is not None and t["key"] == self._tree_key(t["alpha"], t["eps"])

    def _build_tree(self, alpha: float, eps: float) -> None:
        """The sum tree for ``(alpha, eps)``, from scratch (O(cells), in chunks)."""
        m = self.num_cells
        leaves = -(-m // LEAF_CELLS)
        size = 1 << max(0, (leaves - 1).bit_length())  # leaves of a complete binary tree
        w = np.zeros(2 * size, np.float64)  # seen cells' weight sum per node
        u = np.zeros(2 * size, np.int64)  # unseen cells per node
        d = np.zeros(leaves, np.float64)  # seen cells' (clamped) difficulty sum per leaf
        self._tree = {"alpha": alpha, "eps": eps, "size": size, "w": w, "u": u, "d": d}
        step = _REBUILD_CHUNK - _REBUILD_CHUNK % LEAF_CELLS
        for start in range(0, leaves * LEAF_CELLS, step):
            self._refresh_leaves(
                np.arange(start // LEAF_CELLS, min(leaves, (start + step) // LEAF_CELLS)),
                propagate=False,
            )
        node = size // 2
        while node >= 1:  # every internal level at once: parents of [node, 2 * node)
            parents = np.arange(node, 2 * node)
            w[parents] = w[2 * parents] + w[2 * parents + 1]
            u[parents] = u[2 * parents] + u[2 * parents + 1]
            node //= 2
        self._tree["key"] = self._tree_key(alpha, eps)

    def _refresh_leaves(self, leaves: np.ndarray, propagate: bool = True) -> None:
        """Recompute the sums of ``leaves`` from their cells (exact: no drift from increments),
        then of their ancestors."""
        t = self._tree
        m, size = self.num_cells, t["size"]
        cells = leaves[:, None] * LEAF_CELLS + np.arange(LEAF_CELLS)[None]
        inside = cells < m
        wc, seen, d = self._weights(np.minimum(cells, m - 1), t["alpha"], t["eps"])
        t["w"][size + leaves] = np.where(inside, wc, 0.0).sum(1)
        t["u"][size + leaves] = (inside & ~seen).sum(1)
        t["d"][leaves] = np.where(inside, d, 0.0).sum(1)
        if propagate:
            nodes = np.unique((size + leaves) // 2)
            while len(nodes) and nodes[0] >= 1:
                t["w"][nodes] = t["w"][2 * nodes] + t["w"][2 * nodes + 1]
                t["u"][nodes] = t["u"][2 * nodes] + t["u"][2 * nodes + 1]
                if nodes[0] == 1:
                    break
                nodes = np.unique(nodes // 2)
            t["key"] = self._tree_key(t["alpha"], t["eps"])

    def _unseen_weight(self, alpha: float, eps: float) -> float:
        """Weight of an unseen cell: that of the mean difficulty of the seen cells."""
        t = self._tree
        seen = self.num_cells - int(t["u"][1])
        mean = float(t["d"].sum()) / seen if seen else 0.0
        return float(np.power(mean + eps, alpha))

    def draw(self, u: np.ndarray, alpha: float, beta: float, eps: float) -> np.ndarray:
        """Cells (flattened ``image * num_tasks + task``) for uniform numbers ``u`` in [0, 1),
        distributed as :meth:`probabilities`: ``u < beta`` picks a cell uniformly, the rest are
        inverse-CDF draws from the weights, by descending the sum tree (O(log cells) each)."""
        if not self._tree_is_current() or (self._tree["alpha"], self._tree["eps"]) != (alpha, eps):
            self._build_tree(alpha, eps)
        t = self._tree
        m, size, w_tree, u_tree = self.num_cells, t["size"], t["w"], t["u"]
        u = np.asarray(u, np.float64)
        w_u = self._unseen_weight(alpha, eps)
        total = float(w_tree[1]) + int(u_tree[1]) * w_u
        if not np.isfinite(total) or total <= 0:  # no usable weight: uniform, as probabilities()
            return np.minimum((u * m).astype(np.int64), m - 1)
        out = np.empty(len(u), np.int64)
        uniform = u < beta
        out[uniform] = np.minimum((u[uniform] / beta * m).astype(np.int64), m - 1)
        pick = ~uniform
        if pick.any():
            r = (u[pick] - beta) / (1.0 - beta) * total
            node = np.ones(len(r), np.int64)
            while node[0] < size:  # all items sit at the same depth
                left = 2 * node
                lw = w_tree[left] + u_tree[left] * w_u
                rw = w_tree[left + 1] + u_tree[left + 1] * w_u
                right = ((r >= lw) & (rw > 0)) | (lw <= 0)
                r = np.where(right, np.maximum(r - lw, 0.0), r)
                node = left + right
            cells = (node - size)[:, None] * LEAF_CELLS + np.arange(LEAF_CELLS)[None]
            inside = cells < m
            wc, seen, _ = self._weights(np.minimum(cells, m - 1), alpha, eps)
            wc = np.where(inside, np.where(seen, wc, w_u), 0.0)
            cum = np.cumsum(wc, axis=1)
            k = (cum <= r[:, None]).sum(1)  # the first cell whose cumulative weight exceeds r
            last = (
                LEAF_CELLS - 1 - np.argmax((wc > 0)[:, ::-1], axis=1)
            )  # rounding: r past the leaf
            k = np.minimum(k, last)
            out[pick] = cells[np.arange(len(k)), k]
        return out

    def probabilities(self, alpha: float, beta: float, eps: float) -> torch.Tensor:
        """Adaptive target distribution over all cells (flattened ``image * num_tasks + task``).

        Unseen cells count as the mean difficulty of the seen ones (as "average" until measured:
        neither starved nor flooded). Returns float64 tensor of length ``num_cells`` summing to 1.
        O(cells): for inspection and tests; :meth:`draw` samples without it.
        """
        d = self.values.view(-1).to(torch.float64).clamp(min=0.0)
        seen = self.seen.view(-1)
        if bool(seen.any()) and not bool(seen.all()):
            d = torch.where(seen, d, d[seen].mean())
        w = (d + eps).pow(alpha)
        total = w.sum()
        m = self.num_cells
        if not torch.isfinite(total) or total <= 0:
            return torch.full((m,), 1.0 / m, dtype=torch.float64)
        return (1.0 - beta) * w / total + beta / m

    def state_dict(self) -> Dict:
        """Synced table only: records not yet :meth:`sync`-ed are rank-local and not saved."""
        if self._pending_cells:
            logger.warning("ATS: saving the difficulty table with un-synced updates (not saved)")
        return {
            "values": self.values.clone(),
            "seen": self.seen.clone(),
            "ema": self.ema,
            "version": self.version,
        }

    def load_state_dict(self, state: Dict) -> None:
        values = torch.as_tensor(state["values"]).to(torch.float32)  # float64 in older checkpoints
        if tuple(values.shape) != (self.num_images, self.num_tasks):
            raise ValueError(
                f"ATS difficulty table in checkpoint is {tuple(values.shape)}, this run needs "
                f"{(self.num_images, self.num_tasks)} (different dataset or UNSAM.ATS.TASKS?)"
            )
        self.values = values.clone()
        self.seen = torch.as_tensor(state["seen"], dtype=torch.bool).clone()
        self.version = int(state.get("version", 0))
        self._pending_cells, self._pending_values = [], []
        self._tree = None


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------
_UNIFORM_STREAM, _ADAPTIVE_STREAM = 0, 1
_MAX_CACHED_BLOCKS = 256


class _EpochPermutation:
    """A pseudo-random permutation of ``range(m)`` evaluated at any position in O(1), no table.

    The uniform phase visits every cell once per epoch; a ``torch.randperm(m)`` of all cells cost
    O(m) time (~0.1 s at 3 M cells, in the batch that starts an epoch) and 8 bytes per cell.
    Here: a 6-round balanced Feistel network on ``2h`` bits (``2**2h >= m``; round function:
    the splitmix64 finaliser of the right half and a round key from ``(seed, epoch)``), made a
    permutation of ``range(m)`` by cycle walking (re-apply while the result is ``>= m``; fewer
    than 4 times on average, since ``2**2h < 4 m``).
    """

    ROUNDS = 6

    def __init__(self, m: int, seed: int, stream: int, epoch: int):
        self.m = int(m)
        bits = max(2, (self.m - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([seed, stream, epoch]).generate_state(
            self.ROUNDS, dtype=np.uint64
        )

    @staticmethod
    def _mix(x: np.ndarray) -> np.ndarray:
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (self._mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(positions, np.uint64))
        out = x >= self.m
        while out.any():  # cycle walking
            x[out] = self._encrypt(x[out])
            out = x >= self.m
        return x.astype(np.int64)


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    # counter-based seeding: the block index alone determines its random numbers
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator()
    g.manual_seed(int(state))
    return g


class AdaptiveTaskSampler(Sampler):
    """Infinite, distributed-consistent stream of ``(image_index, task_id)`` pairs.

    Args:
        table: the :class:`DifficultyTable` (shared with the feedback hook).
        task_space: a :class:`TaskSpace` or the number of tasks (its ``len`` must match the table).
        start_iter: iterations ``< start_iter`` sample uniformly (per-epoch permutations of all
            cells, evaluated per position: :class:`_EpochPermutation`).
        alpha, beta, eps: adaptive distribution ``(1-beta) * norm((d+eps)^alpha) + beta / M``.
        block_size: items per rank per block; the distribution is re-read once per block.
        seed: shared seed; ``None`` draws one on rank 0 and broadcasts it.
        rank, world_size: default to torch.distributed's (0 / 1 when not initialised).
        items_per_iteration: per-rank batch size; enables exact resume under prefetching
            (see :meth:`set_iteration`). :func:`build_ats_train_loader` sets it.
    """

    def __init__(
        self,
        table: DifficultyTable,
        task_space=None,
        *,
        start_iter: int = 0,
        alpha: float = 1.0,
        beta: float = 0.3,
        eps: float = 0.05,
        block_size: int = 256,
        seed: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        items_per_iteration: Optional[int] = None,
    ):
        if task_space is None:
            task_space = table.num_tasks
        num_tasks = task_space if isinstance(task_space, int) else len(task_space)
        if num_tasks != table.num_tasks:
            raise ValueError(f"task space has {num_tasks} tasks, the table {table.num_tasks}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"UNSAM.ATS.BETA must be in [0, 1], got {beta}")
        if eps < 0 or alpha < 0:
            raise ValueError(f"UNSAM.ATS.ALPHA and EPS must be >= 0, got {alpha}, {eps}")
        if block_size <= 0:
            raise ValueError(f"UNSAM.ATS.BLOCK_SIZE must be > 0, got {block_size}")
        d_rank, d_world = rank_and_world()
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        self.table = table
        self.task_space = task_space if isinstance(task_space, TaskSpace) else None
        self.num_tasks = num_tasks
        self.start_iter = int(start_iter)
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.block_size = int(block_size)
        self.seed = shared_random_seed() if seed is None else int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.items_per_iteration = None if items_per_iteration is None else int(items_per_iteration)

        self._iteration = 0
        self._consumed = 0  # per-rank stream position that training has consumed
        self._next_block = 0  # index of the next block to generate
        self._uniform_offset = 0  # items of the uniform (epoch-permutation) stream used so far
        self._blocks: Dict[int, torch.Tensor] = {}  # global block contents (cells), by index
        self._rank_items: Dict[int, List[int]] = {}  # this rank's slice of each cached block
        self._permutation: Optional[_EpochPermutation] = None  # the current uniform epoch's
        self._reset_token = 0
        self._warned_cache = False

    # ---- public API -------------------------------------------------------------------------
    @property
    def num_cells(self) -> int:
        return self.table.num_cells

    @property
    def adaptive(self) -> bool:
        """Whether newly generated blocks use the adaptive distribution."""
        return self._iteration >= self.start_iter

    @property
    def iteration(self) -> int:
        return self._iteration

    def set_iteration(self, iteration: int) -> None:
        """Tell the sampler that ``iteration`` training iterations are complete.

        Switches to adaptive sampling from ``start_iter`` on (for blocks generated afterwards) and,
        with ``items_per_iteration`` set, marks ``iteration * items_per_iteration`` items of this
        rank's stream as consumed (the resume point), releasing blocks behind it.
        """
        self._iteration = int(iteration)
        if self.items_per_iteration is not None:
            self._consumed = self._iteration * self.items_per_iteration
            self._evict()

    def target_distribution(self) -> torch.Tensor:
        """Distribution (float64, length ``num_cells``) that a block generated now would use."""
        if not self.adaptive:
            return torch.full((self.num_cells,), 1.0 / self.num_cells, dtype=torch.float64)
        return self.table.probabilities(self.alpha, self.beta, self.eps)

    def decode(self, task_id: int) -> Tuple[str, int]:
        """``task_id`` → ``(task name, granularity level)`` (needs a :class:`TaskSpace`)."""
        if self.task_space is None:
            raise ValueError("sampler was built with a task count, not a TaskSpace")
        return self.task_space.tasks[task_id]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "AdaptiveTaskSampler is being iterated inside a DataLoader worker, where "
                "difficulty updates never arrive (detectron2's build_batch_data_loader does "
                "this). Use unsam.data.ats.build_ats_train_loader, which samples in the main "
                "process."
            )
        token = self._reset_token
        pos = self._consumed
        k = self.num_tasks
        while True:
            if token != self._reset_token:  # load_state_dict() happened: continue from there
                token, pos = self._reset_token, self._consumed
            b, off = divmod(pos, self.block_size)
            cell = self._rank_block(b)[off]
            pos += 1
            if self.items_per_iteration is None:
                self._consumed = pos
                if off == self.block_size - 1:
                    self._evict()
            yield cell // k, cell % k

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """Rank-agnostic state (the same on every rank, so rank 0's checkpoint serves all)."""
        first = self._consumed // self.block_size
        kept = sorted(b for b in self._blocks if b >= first)
        return {
            "format": 1,
            "seed": self.seed,
            "world_size": self.world_size,
            "block_size": self.block_size,
            "num_cells": self.num_cells,
            "iteration": self._iteration,
            "consumed": self._consumed,
            "next_block": self._next_block,
            "uniform_offset": self._uniform_offset,
            "blocks": {b: self._blocks[b].clone() for b in kept},
            "table": self.table.state_dict(),
        }

    def load_state_dict(self, state: Dict) -> None:
        if int(state["num_cells"]) != self.num_cells:
            raise ValueError(
                f"ATS sampler state has {state['num_cells']} (image, task) cells, this run has "
                f"{self.num_cells} (different dataset or UNSAM.ATS.TASKS?)"
            )
        self.table.load_state_dict(state["table"])
        self.seed = int(state["seed"])
        self._iteration = int(state["iteration"])
        self._next_block = int(state["next_block"])
        self._uniform_offset = int(state["uniform_offset"])
        self._permutation = None
        self._blocks, self._rank_items = {}, {}
        same_layout = (
            int(state["world_size"]) == self.world_size
            and int(state["block_size"]) == self.block_size
        )
        if same_layout:
            self._consumed = int(state["consumed"])
            for b, cells in state["blocks"].items():
                self._blocks[int(b)] = torch.as_tensor(cells, dtype=torch.int64).clone()
        else:
            # another world size / block size slices blocks differently: continue with fresh
            # blocks (the items drawn ahead but not consumed are skipped)
            logger.warning(
                "ATS: resuming with world_size=%d block_size=%d (saved %s/%s); the stream "
                "continues from the next block, not item-exactly",
                self.world_size,
                self.block_size,
                state["world_size"],
                state["block_size"],
            )
            self._consumed = self._next_block * self.block_size
        self._reset_token += 1

    # ---- internals --------------------------------------------------------------------------
    def _rank_block(self, b: int) -> List[int]:
        items = self._rank_items.get(b)
        if items is None:
            if b not in self._blocks:
                if b < self._next_block:
                    raise RuntimeError(
                        f"ATS block {b} was released already (position moved backwards?)"
                    )
                while self._next_block <= b:
                    self._blocks[self._next_block] = self._generate_block()
                    self._next_block += 1
                if len(self._blocks) > _MAX_CACHED_BLOCKS:
                    self._trim_cache()
            items = self._blocks[b][self.rank :: self.world_size].tolist()
            self._rank_items[b] = items
        return items

    def _generate_block(self) -> torch.Tensor:
        """The next block's cells: O(1) per item in the uniform phase, O(log cells) adaptive."""
        n = self.block_size * self.world_size
        m = self.num_cells
        if not self.adaptive:
            out = []
            while n > 0:
                epoch, start = divmod(self._uniform_offset, m)
                if self._permutation is None or self._permutation.epoch != epoch:
                    self._permutation = _EpochPermutation(m, self.seed, _UNIFORM_STREAM, epoch)
                    self._permutation.epoch = epoch
                take = min(n, m - start)
                out.append(self._permutation(np.arange(start, start + take)))
                self._uniform_offset += take
                n -= take
            return torch.from_numpy(np.concatenate(out))
        g = _generator(self.seed, _ADAPTIVE_STREAM, self._next_block)
        u = torch.rand(n, dtype=torch.float64, generator=g)
        # inverse-CDF sampling through the table's sum tree (no per-block table-sized arrays)
        return torch.from_numpy(self.table.draw(u.numpy(), self.alpha, self.beta, self.eps))

    def _evict(self) -> None:
        first = self._consumed // self.block_size
        for b in [b for b in self._blocks if b < first]:
            del self._blocks[b]
            self._rank_items.pop(b, None)

    def _trim_cache(self) -> None:
        if not self._warned_cache:
            logger.warning(
                "ATS: more than %d blocks drawn ahead of the consumed position; is "
                "set_iteration() being called? Old blocks are dropped (resume is then not exact).",
                _MAX_CACHED_BLOCKS,
            )
            self._warned_cache = True
        for b in sorted(self._blocks)[: len(self._blocks) - _MAX_CACHED_BLOCKS]:
            del self._blocks[b]
            self._rank_items.pop(b, None)


# ---------------------------------------------------------------------------------------------
# dataset / loader glue
# ---------------------------------------------------------------------------------------------
class TaskMapDataset(Dataset):
    """Map-style dataset indexed by the sampler's ``(image_index, task_id)`` pairs.

    ``dataset_dicts``: any map-style dataset of dataset dicts — in training the compact
    :class:`unsam.data.training.TrainingRecords` (the dataset index; no per-image Python object
    copied into the loader workers), or a list.

    The dataset dict handed to ``mapper`` is a shallow copy with ``ats_index``, ``ats_task_id``,
    ``ats_task`` (name) and ``ats_level`` (-1: any) added; the mapper prepares the sample for that
    task. The mapped result gets ``ats_index`` / ``ats_task_id`` (if the mapper did not set them)
    so the feedback hook can report difficulties. When the mapper returns ``None`` another
    random image is tried with the same task.
    """

    def __init__(
        self,
        dataset_dicts: Sequence[Dict],
        mapper: Callable,
        task_space: TaskSpace,
        max_retries: int = 10,
    ):
        if len(dataset_dicts) == 0:
            raise ValueError("TaskMapDataset: empty dataset")
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.task_space = task_space
        self.max_retries = int(max_retries)
        self._rng = random.Random(42)

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, key: Tuple[int, int]):
        index, task_id = int(key[0]), int(key[1])
        name, level = self.task_space.tasks[task_id]
        for attempt in range(self.max_retries + 1):
            record = dict(self.dataset_dicts[index])
            record.update(ats_index=index, ats_task_id=task_id, ats_task=name, ats_level=level)
            out = self.mapper(record)
            if out is not None:
                if isinstance(out, dict):
                    out.setdefault("ats_index", index)
                    out.setdefault("ats_task_id", task_id)
                return out
            if attempt >= 2:
                logger.warning(
                    "ATS: mapper failed on image %d task %s (attempt %d)", index, name, attempt + 1
                )
            index = self._rng.randrange(len(self.dataset_dicts))
        raise RuntimeError(
            f"mapper returned None {self.max_retries + 1} times in a row (task {name})"
        )


def build_ats_sampler(
    cfg, num_images: int, items_per_iteration: Optional[int] = None
) -> AdaptiveTaskSampler:
    """Sampler + table from ``UNSAM.ATS.*``; seed from ``cfg.SEED`` (shared random if < 0)."""
    ats = cfg.UNSAM.ATS
    space = TaskSpace.build(list(ats.TASKS), int(ats.NUM_LEVELS))
    table = DifficultyTable(num_images, len(space), ema=float(ats.EMA))
    seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else None
    return AdaptiveTaskSampler(
        table,
        space,
        start_iter=int(ats.START_ITER),
        alpha=float(ats.ALPHA),
        beta=float(ats.BETA),
        eps=float(ats.EPS),
        block_size=int(ats.BLOCK_SIZE),
        seed=seed,
        items_per_iteration=items_per_iteration,
    )


def build_ats_train_loader(
    dataset: Dataset,
    sampler: AdaptiveTaskSampler,
    batch_size_per_rank: int,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
) -> torch.utils.data.DataLoader:
    """Training loader that samples in the main process (so table updates reach the sampler).

    Yields lists of ``batch_size_per_rank`` mapped dicts (detectron2's trivial collation).
    Sets ``sampler.items_per_iteration`` to the batch size (exact resume, see module docs).
    """
    from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed

    if sampler.items_per_iteration is None:
        sampler.items_per_iteration = int(batch_size_per_rank)
    elif sampler.items_per_iteration != batch_size_per_rank:
        raise ValueError(
            f"sampler.items_per_iteration={sampler.items_per_iteration} "
            f"!= batch size {batch_size_per_rank}"
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, int(batch_size_per_rank), drop_last=True),
        num_workers=int(num_workers),
        collate_fn=trivial_batch_collator if collate_fn is None else collate_fn,
        worker_init_fn=worker_init_reset_seed,
    )
