"""`privacy:`: per-table column and row rules and the key of `hash` masks (pydantic models); the
rules themselves are applied by cdc.transform.privacy."""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, field_validator, model_validator

from cdc.config.common import MODEL_CONFIG, none_to_empty_dict
from cdc.config.names import TableName
from cdc.transform.privacy import Hasher, Mask, TableRules
from cdc.transform.rowfilter import FilterError, RowFilter


def _check_mask(spec: Any) -> Any:
    """`email: hash`, `notes: redact`, `prefs: null` (YAML null), `phone: {keep_last: 4}`, `{keep_first: 1}`."""
    if spec is None or spec in ("hash", "redact"):
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, n), = spec.items()
        if kind in ("keep_first", "keep_last"):
            if type(n) is not int or n < 0:
                raise ValueError(f"{kind} takes a whole number of characters (0 or more)")
            return spec
    written = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else spec
    close = difflib.get_close_matches(str(written), ["hash", "redact", "keep_first", "keep_last"], n=1) if isinstance(
        written, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"a mask is hash, redact, null, {{keep_first: N}} or {{keep_last: N}}{hint}")


MaskSpec = Annotated[Any, AfterValidator(_check_mask)]


def _mask_of(spec: Any) -> Mask:
    if spec is None:
        return Mask("null")
    if isinstance(spec, dict):
        (kind, n), = spec.items()
        return Mask(kind, n)
    return Mask(spec)


def _unique_names(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    seen: set[str] = set()
    for name in v:
        if not name:
            raise ValueError("column names must not be empty")
        if name in seen:
            raise ValueError(f"column {name} is listed twice")
        seen.add(name)
    return v


class TablePrivacy(BaseModel):
    """What of one table may be published (README: Privacy)."""

    model_config = MODEL_CONFIG

    include: Annotated[list[str] | None, AfterValidator(_unique_names)] = None
    exclude: Annotated[list[str], AfterValidator(_unique_names)] = []
    mask: Annotated[dict[str, MaskSpec], BeforeValidator(none_to_empty_dict)] = {}
    rows: str | None = None

    @field_validator("rows")
    @classmethod
    def _filter_parses(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                RowFilter.parse(v)
            except FilterError as exc:
                raise ValueError(f"row filter {exc}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TablePrivacy:
        if self.include is not None and "exclude" in self.model_fields_set:
            raise ValueError("a table takes include or exclude, not both")
        both = [c for c in self.exclude if c in self.mask]
        if both:
            raise ValueError(f"column(s) {', '.join(both)} both excluded and masked")
        if self.include is not None:
            dropped = [c for c in self.mask if c not in self.include]
            if dropped:
                raise ValueError(f"column(s) {', '.join(dropped)} masked but not in include (so never published)")
        return self

    def rules(self) -> TableRules:
        return TableRules(
            include=tuple(self.include) if self.include is not None else None,
            exclude=tuple(self.exclude),
            masks={name: _mask_of(spec) for name, spec in self.mask.items()},
            rows=self.rows,
        )

    @property
    def hashes(self) -> bool:
        return any(spec == "hash" for spec in self.mask.values())


KEY_ID_RE = r"^[A-Za-z0-9._-]{1,32}$"
MIN_HASH_KEY_CHARS = 16


class PrivacyConfig(BaseModel):
    """`privacy:`: per-table column and row rules, and the key of `hash` masks."""

    model_config = MODEL_CONFIG

    # A secret: repr=False, and the loader never quotes it in a message.
    hash_key: str | None = Field(None, repr=False)
    hash_key_id: str = Field("k1", pattern=KEY_ID_RE)
    tables: Annotated[dict[TableName, TablePrivacy], BeforeValidator(none_to_empty_dict)] = {}

    @field_validator("hash_key")
    @classmethod
    def _long_enough(cls, v: str | None) -> str | None:
        if v is not None and len(v) < MIN_HASH_KEY_CHARS:  # never quotes the key
            raise ValueError(f"must have at least {MIN_HASH_KEY_CHARS} characters (a short key can be guessed)")
        return v

    @model_validator(mode="after")
    def _key_when_hashing(self) -> PrivacyConfig:
        if self.hash_key is None and any(t.hashes for t in self.tables.values()):
            hashed = [str(ref) for ref, t in self.tables.items() if t.hashes]
            raise ValueError(f"hash_key is required: {', '.join(hashed)} hash columns (e.g. hash_key: ${{CDC_HASH_KEY}})")
        return self

    def hasher(self) -> Hasher | None:
        return Hasher(self.hash_key, self.hash_key_id) if self.hash_key is not None else None
