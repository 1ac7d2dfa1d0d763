"""Shared dependencies: the repository, artefact store and settings the app factory put on ``app.state``."""

from __future__ import annotations

from fastapi import Request

from service.artefacts import ArtefactStore
from service.db.repository import Repository
from service.settings import Settings


def repo(request: Request) -> Repository:
    return request.app.state.repo  # type: ignore[no-any-return]


def store(request: Request) -> ArtefactStore:
    return request.app.state.store  # type: ignore[no-any-return]


def settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]
