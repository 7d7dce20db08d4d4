"""Weight offloading to disk, streamed layer by layer with prefetch (FlexGen-style, CPU: disk ↔ RAM).

FlexGen (Sheng et al., "FlexGen: High-Throughput Generative Inference of Large Language Models with
a Single GPU", arXiv:2303.06865) keeps weights in a lower tier of memory and overlaps loading layer
``i + 1`` with computing layer ``i``; Accelerate's disk offload does the per-module version. Here
each decoder layer's parameters are written once to one flat file; the layer's parameters are
then *views* into one of three small RAM slots (layer 0 has its own slot, the others alternate),
filled by a background thread that reads the next layer's file while the current layer computes
(``readinto`` releases the GIL, so the read overlaps the math). Resident memory holds the
embeddings, the final norm and head, and three layers' worth of slots instead of every layer.
The layer is loaded when its first module (``input_layernorm``) runs, so the Hugging Face
forward and the static engine (which calls the layer's modules directly) both stream.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn


class LayerStreamer:
    """Stream the decoder layers of ``model`` from files in ``folder`` (see the module docstring)."""

    def __init__(self, model: nn.Module, folder: str | Path | None = None, prefetch: bool = True,
                 patcher: Any = None) -> None:
        decoder = model.get_decoder()
        self.layers = list(decoder.layers)
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="effinfer-offload-"))
        if folder is None:  # a temporary folder goes when the streamer does (or at exit)
            weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefetch = prefetch
        self.specs: list[list[tuple[nn.Parameter, torch.Size, int, int]]] = []
        self.files: list[Path] = []
        dtypes = {p.dtype for layer in self.layers for p in layer.parameters()}
        if len(dtypes) != 1 or any(p.device.type != "cpu" for layer in self.layers for p in layer.parameters()):
            raise ValueError("weight offloading streams decoder layers whose parameters share one dtype on the CPU; "
                             f"found dtypes {sorted(map(str, dtypes))}: run it before techniques that pack weights")
        self.dtype = dtypes.pop()
        largest = 0
        for index, layer in enumerate(self.layers):
            spec, offset = [], 0
            path = self.folder / f"layer{index:03d}.bin"
            with open(path, "wb") as f:
                for param in layer.parameters():
                    f.write(memoryview(param.detach().contiguous().view(torch.uint8).numpy()))
                    spec.append((param, param.shape, offset, param.numel()))
                    offset += param.numel()
            largest = max(largest, offset)
            self.specs.append(spec)
            self.files.append(path)
            empty = torch.empty(0, dtype=self.dtype)
            for param in layer.parameters():
                if patcher is not None:
                    patcher.set_attr(param, "data", empty)
                else:
                    param.data = empty
            norm = layer.input_layernorm
            hooked = self._entering(index, norm.forward)
            if patcher is not None:
                patcher.set_attr(norm, "forward", hooked)
            else:
                norm.forward = hooked
        # the rest (embeddings, final norm, head) may be views of the memory-mapped checkpoint, whose pages the
        # file writes just touched: own copies let the mapping go, so only what stays resident is counted
        for param in model.parameters():
            if param.numel():
                if patcher is not None:
                    patcher.set_attr(param, "data", param.data.clone())
                else:
                    param.data = param.data.clone()
        self.slots = [torch.empty(largest, dtype=self.dtype) for _ in range(3)]
        self.loaded: list[int | None] = [None, None, None]
        self.pending: list[Future | None] = [None, None, None]
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="effinfer-offload")
        self.lock = threading.Lock()
        self.reads = 0

    def slot_of(self, index: int) -> int:
        return 2 if index == 0 else index % 2

    def _entering(self, index: int, forward: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.enter(index)
            return forward(*args, **kwargs)

        return wrapped

    def _read(self, index: int, slot: int) -> None:
        buffer = self.slots[slot]
        size = sum(n for _, _, _, n in self.specs[index]) * buffer.element_size()
        view = memoryview(buffer.view(torch.uint8).numpy())[:size]
        with open(self.files[index], "rb", buffering=0) as f:
            f.readinto(view)
        self.loaded[slot] = index
        self.reads += 1

    def _wait(self, slot: int) -> None:
        future = self.pending[slot]
        if future is not None:
            future.result()
            self.pending[slot] = None

    def enter(self, index: int) -> None:
        """Make layer ``index``'s parameters views of its slot (reading it unless prefetched); prefetch the next."""
        slot = self.slot_of(index)
        self._wait(slot)
        if self.loaded[slot] != index:
            self._read(index, slot)
        buffer = self.slots[slot]
        for param, shape, offset, numel in self.specs[index]:
            param.data = buffer[offset:offset + numel].view(shape)
        if self.prefetch:
            following = (index + 1) % len(self.layers)
            target = self.slot_of(following)
            if target != slot and self.loaded[target] != following:
                self._wait(target)
                self.loaded[target] = None
                self.pending[target] = self.executor.submit(self._read, following, target)

    def file_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def resident_bytes(self) -> int:
        return sum(slot.untyped_storage().nbytes() for slot in self.slots)
