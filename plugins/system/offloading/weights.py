"""Weight offloading, streamed layer by layer with prefetch (FlexGen-style): disk ↔ RAM on the CPU,
pinned RAM ↔ GPU on CUDA (:class:`HostToDeviceStreamer`).

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
        self.patcher = patcher
        self.prefetch = prefetch
        self.specs: list[list[tuple[nn.Parameter, torch.Size, int, int]]] = []
        params = [p for layer in self.layers for p in layer.parameters()]
        dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1 or next(iter(devices)).type != self.device_type:
            raise ValueError(f"{type(self).__name__} streams decoder layers whose parameters share one dtype on the "
                             f"{self.device_type.upper()}; found dtypes {sorted(map(str, dtypes))} on "
                             f"{sorted(map(str, devices))}: run it before techniques that pack weights")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.open_store(folder)
        largest = 0
        for index, layer in enumerate(self.layers):
            spec, offset = [], 0
            for param in layer.parameters():
                spec.append((param, param.shape, offset, param.numel()))
                offset += param.numel()
            self.store_layer(index, [param for param, *_ in spec])
            largest = max(largest, offset)
            self.specs.append(spec)
            empty = torch.empty(0, dtype=self.dtype, device=self.device)
            for param in layer.parameters():
                self._set(param, "data", empty)
            norm = layer.input_layernorm
            self._set(norm, "forward", self._entering(index, norm.forward))
        self.keep_rest(model)
        self.slots = [torch.empty(largest, dtype=self.dtype, device=self.device) for _ in range(3)]
        self.loaded: list[int | None] = [None, None, None]
        self.pending: list[Any] = [None, None, None]
        self.reads = 0

    def _set(self, owner: Any, attribute: str, value: Any) -> None:
        if self.patcher is not None:
            self.patcher.set_attr(owner, attribute, value)
        else:
            setattr(owner, attribute, value)

    # ------------------------------------------------------------------ the lower tier: one file per layer

    device_type = "cpu"

    def open_store(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="effinfer-offload-"))
        if folder is None:  # a temporary folder goes when the streamer does (or at exit)
            weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="effinfer-offload")

    def store_layer(self, index: int, params: list[nn.Parameter]) -> None:
        path = self.folder / f"layer{index:03d}.bin"
        with open(path, "wb") as f:
            for param in params:
                f.write(memoryview(param.detach().contiguous().view(torch.uint8).numpy()))
        self.files.append(path)

    def keep_rest(self, model: nn.Module) -> None:
        # the rest (embeddings, final norm, head) may be views of the memory-mapped checkpoint, whose pages the
        # file writes just touched: own copies let the mapping go, so only what stays resident is counted
        for param in model.parameters():
            if param.numel():
                self._set(param, "data", param.data.clone())

    def start_read(self, index: int, slot: int) -> Future:
        return self.executor.submit(self._read, index, slot)

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
        pending = self.pending[slot]
        if pending is not None:
            pending.result()
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
                self.pending[target] = self.start_read(following, target)

    def file_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def describe(self) -> str:
        return (f"offloaded {len(self.layers)} decoder layers ({self.file_bytes() / 2**20:.0f} MiB) to {self.folder}; "
                f"{self.resident_bytes() / 2**20:.0f} MiB of RAM slots")

    def resident_bytes(self) -> int:
        return sum(slot.untyped_storage().nbytes() for slot in self.slots)


class HostToDeviceStreamer(LayerStreamer):
    """CUDA (RAM ↔ GPU): each layer in one pinned host tensor, three GPU slots, copies on a side stream.

    The copy of layer ``i + 1`` is queued on its own CUDA stream when layer ``i`` starts; that stream
    first waits for everything the compute stream queued so far (layer ``i − 1``, the slot's previous
    tenant, is done before its slot is overwritten), and the compute stream waits for the copy's
    event before layer ``i + 1`` runs. Embeddings, final norm and head stay on the GPU.
    """

    device_type = "cuda"

    def open_store(self, folder: str | Path | None) -> None:
        self.host: list[torch.Tensor] = []
        self.folder = None
        self.copy_stream = torch.cuda.Stream(self.device)

    def store_layer(self, index: int, params: list[nn.Parameter]) -> None:
        flat = torch.empty(sum(p.numel() for p in params), dtype=self.dtype, pin_memory=True)
        offset = 0
        for param in params:
            flat[offset:offset + param.numel()].copy_(param.detach().reshape(-1))
            offset += param.numel()
        self.host.append(flat)

    def keep_rest(self, model: nn.Module) -> None:
        return None

    def _read(self, index: int, slot: int) -> None:
        source = self.host[index]
        self.slots[slot][:source.numel()].copy_(source, non_blocking=True)
        self.loaded[slot] = index
        self.reads += 1

    def start_read(self, index: int, slot: int) -> _CopyDone:
        compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            self._read(index, slot)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return _CopyDone(done, compute)

    def file_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def describe(self) -> str:
        return (f"offloaded {len(self.layers)} decoder layers ({self.file_bytes() / 2**20:.0f} MiB) to pinned host "
                f"RAM; {self.resident_bytes() / 2**20:.0f} MiB of GPU slots")


class _CopyDone:
    """A queued host → GPU copy; ``result()`` makes the compute stream wait for it (no host sync)."""

    def __init__(self, event: Any, stream: Any) -> None:
        self.event, self.stream = event, stream

    def result(self) -> None:
        self.stream.wait_event(self.event)


def layer_streamer(model: nn.Module, folder: str | Path | None = None, prefetch: bool = True,
                   patcher: Any = None) -> LayerStreamer:
    """Disk ↔ RAM for a model on the CPU, RAM ↔ GPU for one on CUDA."""
    on_cuda = next(model.get_decoder().layers[0].parameters()).device.type == "cuda"
    return (HostToDeviceStreamer if on_cuda else LayerStreamer)(model, folder, prefetch, patcher)
