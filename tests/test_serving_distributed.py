"""Tensor parallelism over 2 processes (gloo): logits equal to one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effinfer.core.testing import tiny_model

FAMILIES = ("llama", "qwen2", "gemma3")


def _options(family: str) -> dict:
    return {"kv_heads": 2} if family == "gemma3" else {}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from effinfer.plugins.system.serving.tensor_parallel import shard_model, tp_logits

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
    try:
        results = {}
        for family in FAMILIES:
            model, _ = tiny_model(family, **_options(family))
            ids = torch.arange(3, 40)[None] % model.config.vocab_size
            layout = shard_model(model, rank, world)
            results[family] = tp_logits(layout, ids)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_logits_equal_one_process(tmp_path):
    out = tmp_path / "tp.pt"
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2, join=True,
                       start_method="fork")
    sharded = torch.load(out)
    for family in FAMILIES:
        model, _ = tiny_model(family, **_options(family))
        ids = torch.arange(3, 40)[None] % model.config.vocab_size
        with torch.inference_mode():
            expected = model(ids).logits.float()
        torch.testing.assert_close(sharded[family], expected, atol=1e-4, rtol=1e-4)


def test_a_world_size_that_does_not_divide_the_heads_is_refused():
    from effinfer.plugins.system.serving.tensor_parallel import shard_model

    model, _ = tiny_model("llama")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="divisible"):
        shard_model(model, 0, 3)
