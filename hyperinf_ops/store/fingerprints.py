"""Fingerprints on tables: each row carries the digest of what made it, the table's schema metadata holds
the full description of every digest, and writes refuse (or replace) rows of another fingerprint."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc
from lance.commit import CommitConflictError

from hyperinf_ops.errors import FingerprintMismatchError
from hyperinf_ops.fingerprint import Fingerprint, require_match
from hyperinf_ops.store.schemas import TABLES, sql_literal
from hyperinf_ops.store.transactions import MAX_ATTEMPTS, Data, LanceTables

__all__ = ["FingerprintedTables"]

_FP_PREFIX = "hyperinf.fingerprint."


class FingerprintedTables(LanceTables):
    """LanceTables whose rows carry a `fingerprint` column, registered in the schema metadata."""

    def fingerprints(self, table: str | None = None) -> dict[str, Fingerprint]:
        """Fingerprints registered in `table`'s schema metadata (None: every table's): digest -> Fingerprint."""
        out: dict[str, Fingerprint] = {}
        for name in [table] if table else [t for t in TABLES if self.exists(t)]:
            meta = self.open(name).schema.metadata or {}
            for k, v in meta.items():
                if k.decode().startswith(_FP_PREFIX):
                    out[k.decode()[len(_FP_PREFIX) :]] = Fingerprint.from_json(v.decode())
        return out

    def row_fingerprints(self, table: str, version: int | None = None) -> list[str]:
        """Distinct fingerprint digests carried by `table`'s rows (sorted)."""
        if not self.exists(table):
            return []
        col = self.open(table, version).to_table(columns=["fingerprint"])["fingerprint"]
        return sorted(pc.unique(col).to_pylist())

    def fingerprint(self, table: str, version: int | None = None) -> Fingerprint | None:
        """The one fingerprint of `table`'s rows (None when empty); FingerprintMismatchError when mixed."""
        digests = self.row_fingerprints(table, version)
        if not digests:
            return None
        if len(digests) > 1:
            raise FingerprintMismatchError(f"table {table!r} mixes rows of fingerprints {digests}")
        return self.fingerprints().get(digests[0])

    def check_fingerprint(self, table: str, expected: Fingerprint, version: int | None = None) -> None:
        """Raise FingerprintMismatchError (naming the fields) if any row of `table` has another fingerprint."""
        known = self.fingerprints()
        for digest in self.row_fingerprints(table, version):
            if digest != expected.digest():
                require_match(expected, known.get(digest), f"table {table!r}")

    def set_schema_metadata(self, table: str, key: str, value: str) -> None:
        """Set one key of `table`'s schema metadata unless it holds `value` already (no commit then); concurrent
        updates conflict (Lance refuses two UpdateConfig commits at once), so re-check and retry."""
        for attempt in range(MAX_ATTEMPTS):
            ds = self.open(table)
            if (ds.schema.metadata or {}).get(key.encode()) == value.encode():
                return
            try:
                ds.update_schema_metadata({key: value})
                return
            except OSError:  # CommitConflictError or "Incompatible transaction": another commit won
                time.sleep(min(1.0, 0.01 * 2 ** min(attempt, 6)) * random.random())
        raise CommitConflictError(f"could not set {key} in the schema metadata of {table!r}")

    def _guarded_write(
        self,
        table: str,
        key: Mapping[str, str],
        data: Data,
        schema: pa.Schema,
        fp: Fingerprint,
        overwrite: bool,
    ) -> int:
        """Fingerprint guard + register the fingerprint JSON + one-commit replace of `key`.

        overwrite=False: refuse (nothing written) if rows of another fingerprint exist. overwrite=True: the
        same commit also deletes every row of another fingerprint (safe with concurrent shard writers of
        the new fingerprint: each deletes only stale rows).
        """
        if not overwrite and self.exists(table):
            self.check_fingerprint(table, fp)
        meta_key = _FP_PREFIX + fp.digest()
        # The first writer creates the table with the fingerprint in its schema metadata.
        self._ensure_table(table, schema.with_metadata({meta_key: fp.to_json()}))
        self.set_schema_metadata(table, meta_key, fp.to_json())
        also = f"fingerprint != {sql_literal(fp.digest())}" if overwrite else None
        return self.replace_where(table, key, data, schema=schema, also_delete=also)
