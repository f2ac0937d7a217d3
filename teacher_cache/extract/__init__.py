"""``digpt extract``: run each teacher once over the prepared shards and write the Zarr cache.

One module per job:

* :mod:`.plan` — the unit of work (:class:`ShardJob`, one shard for one tokenizer) and the run's plan;
* :mod:`.pipeline` — one shard's rows through overlapped stages (reader thread, decode/crop threads, the
  teacher forward, a writer thread) joined by bounded queues;
* :mod:`.worker` — :func:`extract_shard`, the per-shard extraction, and the :class:`Worker` that runs it
  in-process or as a Ray actor (several shards at once with ``shards_in_flight``);
* :mod:`.tokenizers` — the cache root, provenance, and fitting what fitted families fit;
* :mod:`.driver` — :func:`run_extract`: lock, plan, Ray pool, results;
* :mod:`.summary` — totals, failures and the reports written beside the cache.
"""

from ..config import ExtractConfig
from .driver import run_extract
from .plan import ShardJob, ShardResult
from .summary import ExtractSummary, TokenizerSummary, write_report
from .tokenizers import sample_base_tokens
from .worker import FAULT_PAUSE_ENV, Worker, extract_shard

__all__ = [
    "FAULT_PAUSE_ENV",
    "ExtractConfig",
    "ExtractSummary",
    "ShardJob",
    "ShardResult",
    "TokenizerSummary",
    "Worker",
    "extract_shard",
    "run_extract",
    "sample_base_tokens",
    "write_report",
]
