"""All of Graft's configuration, in one object built once at start-up.

Only composition roots (the CLI, the API app factory, the Celery app) call :func:`load_settings`;
everything below them receives a :class:`Settings` instance. Nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry.errors import InvalidConfig


class Settings(BaseSettings):
    """Graft settings, read from ``GRAFT_*`` environment variables.

    With nothing set, Graft runs embedded: SQLite and artifacts under ``GRAFT_HOME`` (``./.graft``).
    """

    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore", frozen=True)

    home: Path = Field(default=Path(".graft"), description="Folder holding the embedded state.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset means SQLite at GRAFT_HOME/graft.db."
    )
    artifacts_dir: Path | None = Field(
        default=None, description="Artifact store folder; unset means GRAFT_HOME/artifacts."
    )
    max_rank: int = Field(default=1024, ge=1, description="Ranks above this are truncated, with a warning.")

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if "://" not in value:
            raise ValueError("must be a SQLAlchemy URL such as postgresql+psycopg://user@host/db or sqlite:///path.db")
        return value

    @property
    def resolved_database_url(self) -> str:
        """The database URL in use: the configured one, or the embedded SQLite file."""
        if self.database_url:
            url = self.database_url
            # Users paste libpq-style URLs; route them to psycopg 3, the driver we ship.
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{(self.home / 'graft.db').resolve()}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        """Where content-addressed artifacts are stored."""
        return self.artifacts_dir if self.artifacts_dir is not None else self.home / "artifacts"


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment (and explicit overrides), or raise :class:`InvalidConfig`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"GRAFT_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidConfig(f"invalid configuration: {problems}") from None
