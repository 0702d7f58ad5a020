"""Helpers shared by the service tests: a running app with shortcuts to make keys, and auth headers."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.testclient import TestClient

from cumulo.service import crud
from cumulo.service.state import ServiceState


@dataclass
class Service:
    client: TestClient
    state: ServiceState

    def key(self, org: str = "acme", plan: str = "default", **plan_terms: object) -> str:
        """A new key; `plan_terms` create the plan first (rpm=..., tpm=..., models=[...], ...)."""
        with self.state.sessions() as session, session.begin():
            if plan_terms:
                crud.create_plan(session, plan, **plan_terms)  # type: ignore[arg-type]
            _, secret = crud.create_key(session, self.state.hasher, org_name=org, plan_name=plan)
        return secret

    def admin_key(self) -> str:
        with self.state.sessions() as session, session.begin():
            _, secret = crud.create_key(
                session, self.state.hasher, org_name=crud.ADMIN_ORG, plan_name="default", is_admin=True
            )
        return secret


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
