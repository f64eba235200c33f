"""One storage layer for every artefact dit-lens writes.

- `locks`: exclusive OS file locks, atomic writes, stale temporaries of dead processes.
- `folders`: claiming output folders (new, empty or dit-lens-marked), their identity, and removing
  only the entries dit-lens recorded writing there.
- `cache`: where cached artefacts live (one rule for all of them).
- `inuse`: marks of the processes using a folder now, so a folder is replaced only when none does.
- `records`: digests over data *and* attributes, sealed JSON records, safetensors and weights-only
  torch files, all read back with clear errors that name the file.

Every feature that writes a result goes through these; none claims folders, digests or loads files
its own way.
"""

from .cache import CACHE_ENV, cache_root, checkout_root, content_key
from .folders import MARKER, Claim, FolderClaimError, check_files, claim, claimed, differences, file_digests
from .locks import BusyError, exclusive, lock_path, remove_stale_temporaries, temporary_name, try_exclusive, write_atomic
from .records import (DIGEST, DamagedError, MissingError, StorageError, all_finite, dataset_digest, digest, jsonable,
                      load_torch, read_record, read_tensors, save_torch, tree_digest, write_record, write_tensors)

__all__ = [
    "CACHE_ENV", "DIGEST", "MARKER", "BusyError", "Claim", "DamagedError", "FolderClaimError", "MissingError", "StorageError",
    "all_finite", "cache_root", "check_files", "checkout_root", "claim", "content_key", "claimed", "dataset_digest", "differences", "digest", "file_digests", "exclusive", "jsonable",
    "load_torch", "lock_path", "read_record", "read_tensors", "remove_stale_temporaries", "save_torch",
    "temporary_name", "tree_digest", "try_exclusive", "write_atomic", "write_record", "write_tensors",
]
