"""Admission checks of a merge job: the adapters exist for this tenant, are not too many, and share a base."""

from __future__ import annotations

from app.errors import Unprocessable
from app.records import Records
from app.schemas.jobs import MergeJobCreate
from app.settings import Settings


def check(records: Records, settings: Settings, tenant: str, spec: MergeJobCreate) -> None:
    adapter_ids = spec.input_adapter_ids()
    if len(adapter_ids) > settings.max_merge_adapters:
        raise Unprocessable(f"at most {settings.max_merge_adapters} adapters per merge", code="too_many_adapters")
    adapters = [records.get_adapter(tenant, adapter_id) for adapter_id in adapter_ids]
    if not spec.params.get("allow_base_mismatch"):
        bases = {a.base_model for a in adapters if a.base_model}
        if len(bases) > 1:
            raise Unprocessable(
                f"the adapters were trained on different base models {sorted(bases)}; "
                "set params.allow_base_mismatch to merge them anyway",
                code="incompatible_adapters",
            )
