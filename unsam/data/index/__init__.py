"""A lazy dataset index over pseudo-label folders, SA-1B's own tar files and TSV shards.

One compact row per image (where its record is, where its image is, height, width, mask count)
in memory-mapped numpy arrays, built once per root and cached, so that training starts in seconds
and each process holds ~100 bytes per image instead of every mask of every image.

* :mod:`.formats` — the three source formats; what indexing reads from one record (not the masks);
* :mod:`.build` — planning, parallel / resumable / incremental indexing, merging (the on-disk
  layout);
* :mod:`.dataset` — :class:`IndexedDataset`, the map-style dataset the trainer's loader reads;
* :mod:`.tsv` — the converter to the published UnSAM / Semantic-SAM TSV shards;
* ``python -m unsam.data.index ROOT [ROOT ...]`` — build / update, optionally ``--to-tsv OUT``.
"""

from .build import BuildSummary, build_index, find_index, index_dir_for  # noqa: F401
from .dataset import IndexedDataset, sample_indices  # noqa: F401
from .formats import KINDS, ROW_DTYPE  # noqa: F401
from .tsv import write_tsv_shards  # noqa: F401
