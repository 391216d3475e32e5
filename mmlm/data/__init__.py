"""Data: readers (LLaVA JSON/JSONL, HF datasets, the shapes world), stage datasets, collation."""

from mmlm.data.dataset import StageDataset
from mmlm.data.records import Record
from mmlm.data.sources import read_source

__all__ = ["Record", "StageDataset", "read_source"]
