"""Adaptive task sampler: target frequencies, distributed consistency, exact resume."""

import io
import itertools
import logging
from pathlib import Path

import unsam.compat  # noqa: F401

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats

from unsam.config import get_unsam_cfg
from unsam.data.ats import (
    AdaptiveTaskSampler,
    DifficultyTable,
    TaskMapDataset,
    TaskSpace,
    build_ats_sampler,
    build_ats_train_loader,
)


def _difficulty(image: int, task: int, iteration: int) -> float:
    # dyadic values: sums are exact in float64, so the order in which ranks' records are
    # aggregated cannot change a single bit of the table
    return ((image * 7 + task * 3 + iteration) % 8) / 8.0


def _train_loop(sampler, table, iterations, batch, start_iter=0, stream=None):
    """Simulate the trainer + feedback hook; returns the list of per-iteration batches."""
    it = iter(sampler) if stream is None else stream
    out = []
    for i in range(start_iter, start_iter + iterations):
        items = [next(it) for _ in range(batch)]
        out.append(items)
        table.update(
            [a for a, _ in items], [t for _, t in items], [_difficulty(a, t, i) for a, t in items]
        )
        table.sync()
        sampler.set_iteration(i + 1)
    return out


# ---------------------------------------------------------------------------------------------
def test_task_space_levels_and_errors():
    space = TaskSpace.build(["whole", "point", "box"], num_levels=3)
    assert len(space) == 1 + 3 + 3
    assert space.tasks[0] == ("whole", -1)
    assert space.index("box", 2) == 6 and space.name(6) == "box" and space.level(6) == 2
    assert len(TaskSpace.build(["whole", "point", "box", "mask"])) == 4
    with pytest.raises(ValueError, match="unknown task"):
        TaskSpace.build(["whole", "scribble"])


def test_table_ema_first_observation_and_average():
    table = DifficultyTable(3, 2, ema=0.5)
    table.update([0, 0, 2], [1, 1, 0], [1.0, 3.0, 4.0])
    assert table.values.sum() == 0  # nothing applied before sync
    assert table.sync() == 2
    assert table.values[0, 1] == 2.0 and table.values[2, 0] == 4.0  # mean of first observations
    table.update([0], 1, [4.0])
    table.sync()
    assert table.values[0, 1] == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)
    assert table.seen.sum() == 2 and table.version == 2
    table.update([1], [0], [float("nan")])
    assert table.sync() == 0
    with pytest.raises(IndexError):
        table.update([3], [0], [1.0])


def test_probabilities_formula_and_unseen_cells():
    table = DifficultyTable(2, 2, ema=0.0)
    table.update([0, 0, 1], [0, 1, 0], [1.0, 3.0, 0.0])
    table.sync()
    p = table.probabilities(alpha=2.0, beta=0.2, eps=0.5)
    d = torch.tensor([1.0, 3.0, 0.0, 4.0 / 3.0], dtype=torch.float64)  # unseen → mean of seen
    w = (d + 0.5) ** 2
    expected = 0.8 * w / w.sum() + 0.2 / 4
    assert torch.allclose(p, expected) and p.sum().item() == pytest.approx(1.0)


def test_uniform_phase_is_epoch_permutations():
    table = DifficultyTable(10, 3)
    sampler = AdaptiveTaskSampler(table, 3, start_iter=10**9, block_size=7, seed=3)
    draws = list(itertools.islice(iter(sampler), 90))
    cells = [a * 3 + t for a, t in draws]
    for epoch in range(3):
        assert sorted(cells[epoch * 30 : (epoch + 1) * 30]) == list(range(30))
    assert cells[:30] != cells[30:60]  # a new permutation each epoch
    other = AdaptiveTaskSampler(DifficultyTable(10, 3), 3, start_iter=10**9, block_size=7, seed=4)
    assert list(itertools.islice(iter(other), 30)) != draws[:30]


def test_adaptive_frequencies_match_target_chi_square():
    n_img, n_task, n = 60, 4, 100_000
    table = DifficultyTable(n_img, n_task, ema=0.9)
    g = torch.Generator().manual_seed(1)
    table.update(
        torch.arange(n_img).repeat_interleave(n_task),
        torch.arange(n_task).repeat(n_img),
        torch.rand(n_img * n_task, generator=g) ** 3 * 5,
    )
    table.sync()
    sampler = AdaptiveTaskSampler(
        table, n_task, start_iter=100, alpha=1.5, beta=0.3, eps=0.05, block_size=1000, seed=11
    )
    sampler.set_iteration(100)
    target = sampler.target_distribution()
    assert target.max() / target.min() > 10  # the test below has something to distinguish
    counts = torch.zeros(n_img * n_task, dtype=torch.float64)
    for a, t in itertools.islice(iter(sampler), n):
        counts[a * n_task + t] += 1
    expected = (target * n).numpy()
    p_target = stats.chisquare(counts.numpy(), expected).pvalue
    p_uniform = stats.chisquare(counts.numpy()).pvalue
    assert p_target > 1e-3, p_target
    assert p_uniform < 1e-12, p_uniform  # and it is clearly not uniform sampling


def test_switches_to_adaptive_at_start_iter():
    table = DifficultyTable(4, 1, ema=0.0)
    table.update([0, 1, 2, 3], 0, [10.0, 0.0, 0.0, 0.0])
    table.sync()
    sampler = AdaptiveTaskSampler(
        table,
        1,
        start_iter=5,
        alpha=1.0,
        beta=0.0,
        eps=0.0,
        block_size=4,
        seed=0,
        items_per_iteration=4,
    )
    it = iter(sampler)
    uniform = [next(it)[0] for _ in range(4)]
    assert sorted(uniform) == [0, 1, 2, 3]
    sampler.set_iteration(5)
    assert [next(it)[0] for _ in range(8)] == [0] * 8  # all mass on the only hard image


# ---------------------------------------------------------------------------------------------
N_IMG, N_TASK, ITERS, START, BATCH, BLOCK = 16, 4, 20, 8, 8, 12


def _rank_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        table = DifficultyTable(N_IMG, N_TASK, ema=0.9)
        sampler = AdaptiveTaskSampler(
            table, N_TASK, start_iter=START, block_size=BLOCK, items_per_iteration=BATCH
        )  # seed=None: shared by broadcast
        assert sampler.rank == rank and sampler.world_size == world
        batches = _train_loop(sampler, table, ITERS, BATCH)
        torch.save(
            {"batches": batches, "values": table.values, "seen": table.seen, "seed": sampler.seed},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_disjoint_and_tables_agree(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["seed"] == r1["seed"]
    # tables bit-identical after sync, and not trivially empty
    assert torch.equal(r0["values"], r1["values"]) and torch.equal(r0["seen"], r1["seen"])
    assert r0["seen"].all()
    # uniform phase: the first epoch (64 cells = 4 iterations × 2 ranks × 8) is split disjointly
    cells0 = [a * N_TASK + t for b in r0["batches"][:4] for a, t in b]
    cells1 = [a * N_TASK + t for b in r1["batches"][:4] for a, t in b]
    assert not set(cells0) & set(cells1)
    assert sorted(cells0 + cells1) == list(range(N_IMG * N_TASK))
    # the two ranks read one shared stream: same as a single process with the global batch
    table = DifficultyTable(N_IMG, N_TASK, ema=0.9)
    ref_sampler = AdaptiveTaskSampler(
        table, N_TASK, start_iter=START, block_size=2 * BLOCK, seed=r0["seed"], rank=0, world_size=1
    )
    ref = _train_loop(ref_sampler, table, ITERS, 2 * BATCH)
    for i in range(ITERS):
        assert r0["batches"][i] == ref[i][0::2], i
        assert r1["batches"][i] == ref[i][1::2], i
    assert torch.equal(table.values, r0["values"])


# ---------------------------------------------------------------------------------------------
def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def test_resume_reproduces_uninterrupted_sequence():
    def make():
        table = DifficultyTable(12, 3, ema=0.8)
        return table, AdaptiveTaskSampler(
            table, 3, start_iter=6, block_size=10, seed=5, items_per_iteration=4
        )

    table, sampler = make()
    stream = iter(sampler)
    _train_loop(sampler, table, 9, 4, stream=stream)
    # draw ahead of the consumed position (36 items), like a prefetching loader does; this
    # crosses into a new block that must be replayed after resume, not redrawn
    ahead = [next(stream) for _ in range(13)]
    state = _roundtrip(sampler.state_dict())
    assert state["consumed"] == 36 and state["iteration"] == 9
    uninterrupted = _train_loop(
        sampler, table, 10, 4, start_iter=9, stream=itertools.chain(ahead, stream)
    )

    table2, sampler2 = make()
    sampler2.load_state_dict(state)
    resumed = _train_loop(sampler2, table2, 10, 4, start_iter=9)
    assert resumed == uninterrupted
    assert torch.equal(table2.values, table.values)
    # and the adaptive phase really depends on the table (resume is not trivially equal)
    table3, sampler3 = make()
    sampler3.load_state_dict(state)
    table3.values.mul_(0).add_(torch.rand(table3.values.shape))
    sampler3._blocks.clear()
    sampler3._consumed = sampler3._next_block * sampler3.block_size
    other = _train_loop(sampler3, table3, 10, 4, start_iter=9)
    assert other != uninterrupted


def test_resume_with_prefetching_dataloader():
    def make():
        space = TaskSpace.build(["whole", "point"])
        table = DifficultyTable(10, len(space), ema=0.7)
        sampler = AdaptiveTaskSampler(table, space, start_iter=3, block_size=5, seed=9)
        dataset = TaskMapDataset([{"image_id": i} for i in range(10)], _toy_mapper, space)
        loader = build_ats_train_loader(dataset, sampler, batch_size_per_rank=3, num_workers=2)
        return table, sampler, loader

    def run(table, sampler, loader, start, stop, save_at=None):
        seen, state = [], None
        it = iter(loader)
        for i in range(start, stop):
            batch = next(it)
            seen.append([(d["ats_index"], d["ats_task_id"]) for d in batch])
            assert all(d["task"] == sampler.decode(d["ats_task_id"])[0] for d in batch)
            table.update(
                [d["ats_index"] for d in batch],
                [d["ats_task_id"] for d in batch],
                [_difficulty(d["ats_index"], d["ats_task_id"], i) for d in batch],
            )
            table.sync()
            sampler.set_iteration(i + 1)
            if save_at == i + 1:
                state = _roundtrip(sampler.state_dict())
        return seen, state

    full, state = run(*make(), 0, 14, save_at=6)
    assert state["consumed"] == 18
    # the workers had prefetched past the consumed position: blocks beyond it were saved
    assert state["next_block"] * 5 > 18 + 3 and len(state["blocks"]) >= 2
    table, sampler, loader = make()
    sampler.load_state_dict(state)
    resumed, _ = run(table, sampler, loader, 6, 14)
    assert resumed == full[6:]


def _toy_mapper(record):
    return {
        "ats_index": record["ats_index"],
        "ats_task_id": record["ats_task_id"],
        "task": record["ats_task"],
        "image_id": record["image_id"],
    }


def test_sampler_refuses_to_run_inside_a_worker():
    from detectron2.data.common import ToIterableDataset

    sampler = AdaptiveTaskSampler(DifficultyTable(4, 1), 1, seed=0)
    ds = ToIterableDataset(list(range(4)), sampler)
    loader = torch.utils.data.DataLoader(ds, num_workers=1, batch_size=None)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        next(iter(loader))


def test_task_map_dataset_retries_failed_mapper():
    space = TaskSpace.build(["whole", "box"], num_levels=2)
    calls = []

    def mapper(rec):
        calls.append(rec["ats_index"])
        if rec["ats_index"] == 1:
            return None
        return {"i": rec["ats_index"], "task": rec["ats_task"], "level": rec["ats_level"]}

    ds = TaskMapDataset([{"k": i} for i in range(5)], mapper, space)
    out = ds[(1, space.index("box", 1))]
    assert out["i"] != 1 and out["ats_index"] == out["i"]
    assert out["task"] == "box" and out["level"] == 1 and out["ats_task_id"] == 2
    assert calls[0] == 1


def test_build_from_config_and_state_mismatch(caplog):
    cfg = get_unsam_cfg()
    cfg.SEED = 123
    cfg.UNSAM.ATS.NUM_LEVELS = 2
    cfg.UNSAM.ATS.BLOCK_SIZE = 8
    sampler = build_ats_sampler(cfg, num_images=5, items_per_iteration=2)
    assert sampler.seed == 123 and sampler.num_tasks == 1 + 3 * 2
    assert sampler.table.num_cells == 5 * 7
    assert sampler.decode(2) == ("point", 1)
    other = build_ats_sampler(cfg, num_images=6)
    with pytest.raises(ValueError, match="cells"):
        other.load_state_dict(sampler.state_dict())
    # another world size: warns and continues from the next block
    list(itertools.islice(iter(sampler), 5))
    state = sampler.state_dict()
    moved = AdaptiveTaskSampler(
        DifficultyTable(5, 7), 7, block_size=8, seed=1, rank=1, world_size=2
    )
    with caplog.at_level(logging.WARNING):
        moved.load_state_dict(state)
    assert "not item-exactly" in caplog.text
    assert next(iter(moved)) is not None
