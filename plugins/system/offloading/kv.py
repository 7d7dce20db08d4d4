"""KV offloading beyond a budget: the newest entries in RAM, older ones in blocks on disk, read back exactly.

FlexGen (Sheng et al., arXiv:2303.06865) places the KV cache, like the weights, in whichever tier
of memory has room, and streams it to the compute device when a layer attends. Here each
attention layer keeps its newest ``budget`` … ``budget + block`` entries in RAM; whenever the RAM
part reaches ``budget + block`` entries, its oldest ``block`` are appended to the layer's key and
value files on disk (plain files, written once). A forward reads the whole disk part back (one
``preadv`` per file at batch 1; the OS page cache sits between, outside the process's resident
memory) into a staging buffer *shared by all layers* and attends over ``disk part | RAM part |
new entries`` — every entry, bit for bit, so the model's output equals the full cache's.

Resident KV memory is then ``layers × budget`` entries plus one layer's full KV in the staging
buffer, instead of ``layers × tokens``; the price is re-reading the offloaded part every step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from effinfer.core.kv_cache import KVPolicy

#: staging capacities grow in steps of this many tokens
STAGING_STEP = 1024


class Staging:
    """One pair of ``B × capacity × kv_heads × head_dim`` buffers that every layer of a cache reuses in turn
    (a layer's keys and values are read into it just before that layer attends)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def buffers(self, like: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _, dim = like.shape
        if self.keys is None or self.keys.shape[1] < tokens or self.keys.shape[0] != batch or \
                self.keys.dtype != like.dtype:
            capacity = -(-tokens // STAGING_STEP) * STAGING_STEP
            self.keys = self.values = None  # free before allocating
            self.keys = torch.empty(batch, capacity, heads, dim, dtype=like.dtype, device=like.device)
            self.values = torch.empty_like(self.keys)
        return self.keys[:, :tokens], self.values[:, :tokens]


def read_into(fd: int, target: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor ``target`` from file ``fd`` at byte ``offset``."""
    view = memoryview(target.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read from the offloaded KV file ({done} of {len(view)} bytes)")
        done += got


class OffloadedKVPolicy(KVPolicy):
    """RAM holds the newest ``budget`` (+ up to ``block``) entries; older blocks live on disk (see the module)."""

    name = "offload_kv"

    def __init__(self, budget: int, block: int, folder: str | Path | None = None,
                 staging: Staging | None = None) -> None:
        super().__init__()
        if budget < 1 or block < 1:
            raise ValueError(f"budget ({budget}) and block ({block}) must be positive")
        self.budget, self.block = budget, block
        self.folder = Path(folder) if folder else None
        self.staging = staging or Staging()
        self.files: list | None = None  # key file, value file (deleted when closed)
        self.on_disk = 0                # entries on disk, oldest first

    def _open(self) -> list:
        if self.files is None:
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
            self.files = [tempfile.TemporaryFile(dir=self.folder, prefix="effinfer-kv-") for _ in range(2)]
        return self.files

    def update(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        ram_k = keys if self.keys is None else torch.cat([self.keys, keys], dim=-2)
        ram_v = values if self.values is None else torch.cat([self.values, values], dim=-2)
        self.seen += keys.shape[-2]
        if self.on_disk:
            out_k, out_v = self._gather(ram_k, ram_v)
        else:
            out_k, out_v = ram_k, ram_v
        spill = (ram_k.shape[-2] - self.budget) // self.block * self.block
        if spill > 0:
            self._write(ram_k[..., :spill, :], ram_v[..., :spill, :])
            ram_k, ram_v = ram_k[..., spill:, :].clone(), ram_v[..., spill:, :].clone()
        self.keys, self.values = ram_k, ram_v
        return out_k, out_v

    def _gather(self, ram_k: torch.Tensor, ram_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``disk part | RAM part`` in the staging buffers, as ``B × heads × tokens × dim`` views."""
        total = self.on_disk + ram_k.shape[-2]
        stage_k, stage_v = self.staging.buffers(ram_k, total)
        for file, stage, ram in zip(self._open(), (stage_k, stage_v), (ram_k, ram_v)):
            batch = stage.shape[0]
            if batch == 1:  # the file holds (block × heads × dim) chunks back to back: one read
                read_into(file.fileno(), stage[0, :self.on_disk], 0)
            else:
                row = self.block * stage[0, 0].numel() * stage.element_size()
                for b_index, start in enumerate(range(0, self.on_disk, self.block)):
                    for b in range(batch):
                        read_into(file.fileno(), stage[b, start:start + self.block], (b_index * batch + b) * row)
            stage[:, self.on_disk:total] = ram.transpose(1, 2)
        return stage_k.transpose(1, 2), stage_v.transpose(1, 2)

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for file, part in zip(self._open(), (keys, values)):
            file.seek(0, os.SEEK_END)
            for start in range(0, part.shape[-2], self.block):  # per block: batch rows of (block × heads × dim)
                chunk = part[..., start:start + self.block, :].transpose(1, 2).contiguous()
                file.write(memoryview(chunk.view(torch.uint8).numpy()).cast("B"))
            file.flush()
        self.on_disk += keys.shape[-2]

    def __len__(self) -> int:
        return self.seen

    def crop(self, count: int) -> None:
        ram = 0 if self.keys is None else self.keys.shape[-2]
        if count > ram:
            raise NotImplementedError(f"offload_kv cannot roll back {count} entries: only its {ram} newest are in "
                                      "RAM (raise budget for speculative decoding)")
        KVPolicy.crop(self, count)

    def nbytes(self) -> int:
        """Bytes held in RAM (this layer's part; the shared staging buffer is counted by the cache's walk)."""
        return sum(t.untyped_storage().nbytes() for t in (self.keys, self.values) if t is not None)

    def disk_bytes(self) -> int:
        return sum(os.fstat(f.fileno()).st_size for f in self.files) if self.files else 0

    def reset(self) -> None:
        self.keys = self.values = None
        self.seen = self.on_disk = 0
        if self.files:
            for f in self.files:
                f.truncate(0)


def offloaded_kv_factory(budget: int, block: int, folder: str | Path | None = None):
    """A policy factory (``(layer, config) -> policy``) whose layers share one staging buffer per cache."""
    shared: dict[str, object] = {"last": None, "staging": None}

    def make(layer: int, config: object) -> OffloadedKVPolicy:
        if shared["staging"] is None or shared["last"] is None or layer <= shared["last"]:
            shared["staging"] = Staging()  # a new cache starts at its first layer
        shared["last"] = layer
        return OffloadedKVPolicy(budget, block, folder, shared["staging"])

    return make
