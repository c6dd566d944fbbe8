"""`GET /v1/webhooks/secret`: the caller's tenant's webhook signing secret, to verify deliveries with."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import SettingsDep, Writer
from app.webhooks import tenant_secret_text

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSecretPublic(BaseModel):
    secret: str = Field(description="`whsec_<base64 key>`: the HMAC-SHA256 key of `webhook-signature` (Standard "
                        "Webhooks), the same for every job of this tenant.")


@router.get("/secret", response_model=WebhookSecretPublic, summary="The tenant's webhook signing secret")
async def webhook_secret(caller: Writer, settings: SettingsDep) -> WebhookSecretPublic:
    return WebhookSecretPublic(secret=tenant_secret_text(settings, caller.tenant))
