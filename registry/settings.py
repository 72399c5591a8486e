"""All of Graft's configuration, in one object built once at start-up.

Only composition roots (the CLI, the API app factory, the Celery app) call :func:`load_settings`;
everything below them receives a :class:`Settings` instance. Nothing else reads the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry.db import POOL_CAPACITY, POOL_SIZE
from registry.errors import InvalidConfig

DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
LOCAL_HUB_NAMESPACE = "graft"
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
# Hugging Face user access tokens look like this; they are redacted even when they are not ours.
_HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
REDACTED = "***"


class Settings(BaseSettings):
    """Graft settings, read from ``GRAFT_*`` environment variables.

    With nothing set, Graft runs embedded: SQLite and artifacts under ``GRAFT_HOME`` (``./.graft``).
    """

    model_config = SettingsConfigDict(
        env_prefix="GRAFT_", extra="ignore", frozen=True, validate_by_name=True, validate_by_alias=True
    )

    home: Path = Field(default=Path(".graft"), description="Folder holding the embedded state.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset means SQLite at GRAFT_HOME/graft.db."
    )
    artifacts_dir: Path | None = Field(
        default=None, description="Artifact store folder; unset means GRAFT_HOME/artifacts."
    )
    max_rank: int = Field(default=1024, ge=1, description="Ranks above this are truncated, with a warning.")

    # -- the service: API, auth and workers (issue 5) ---------------------------------------------------
    broker_url: str | None = Field(
        default=None,
        description="Celery broker, e.g. redis://host:6379/0. Unset: embedded mode, where `graft serve` runs queued "
        "jobs in a thread of its own process (the merge_jobs table is the queue).",
    )
    broker_transport_options: dict[str, Any] = Field(
        default_factory=dict,
        description='Extra kombu transport options as JSON, e.g. {"global_keyprefix": "graft:"}.',
    )
    merge_queue: str = Field(default="merge", min_length=1, description="Celery queue of merge tasks (GPU workers).")
    publish_queue: str = Field(default="publish", min_length=1, description="Celery queue of publish tasks.")
    merge_time_limit_seconds: int = Field(
        default=4 * 3600, ge=1, description="A merge running longer than this is stopped and recorded as failed."
    )
    visibility_timeout_seconds: int = Field(
        default=6 * 3600,
        ge=1,
        description="Seconds before Redis hands an unacknowledged task to another worker; above the merge time limit.",
    )
    progress_interval_seconds: float = Field(
        default=0.5, gt=0, description="How often a running merge writes its progress and checks for a cancel."
    )
    public_reads: bool = Field(default=True, description="Reads need no token when true; writes always need one.")
    max_upload_bytes: int = Field(default=4 << 30, ge=1, description="Largest adapter upload (all files together).")
    api_max_concurrency: int = Field(
        default=POOL_SIZE,
        ge=1,
        le=POOL_CAPACITY,
        description="Requests one API process handles at once; more wait their turn. At most the database "
        f"connection pool ({POOL_CAPACITY}), so a running request never waits for a connection.",
    )

    # -- publishing (issue 6) ------------------------------------------------------------------------
    hub_endpoint: str | None = Field(
        default=None,
        description="Hub-compatible server (https://…), or file:///folder for the local folder. Unset: the public "
        "Hub when GRAFT_HUB_NAMESPACE is set, else the local folder GRAFT_HOME/hub.",
    )
    hub_namespace: str | None = Field(default=None, description="User or organisation that owns published repos.")
    hub_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("GRAFT_HUB_TOKEN", "HF_TOKEN"),
        description="Hub access token (GRAFT_HUB_TOKEN, else HF_TOKEN). Never stored, logged or echoed.",
    )
    hub_token_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("GRAFT_HUB_TOKEN_FILE", "HF_TOKEN_PATH"),
        description="File holding the token; for the public Hub, `hf auth login`'s file is the fallback.",
    )
    hf_home: Path | None = Field(
        default=None, validation_alias="HF_HOME", description="Where `hf auth login` keeps its token file."
    )
    hub_local_dir: Path | None = Field(default=None, description="Local-folder Hub; unset means GRAFT_HOME/hub.")
    hub_private: bool = Field(default=False, description="Create missing repos as private.")
    hub_max_attempts: int = Field(default=5, ge=1, le=20, description="Tries per publication on 5xx/timeouts.")
    hub_backoff_seconds: float = Field(default=1.0, ge=0, description="First retry delay; doubles each time.")
    hub_backoff_max_seconds: float = Field(default=30.0, ge=0, description="Cap on one retry delay.")
    hub_timeout_seconds: float = Field(default=60.0, gt=0, description="Timeout of one HTTP request to the Hub.")

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if "://" not in value:
            raise ValueError("must be a SQLAlchemy URL such as postgresql+psycopg://user@host/db or sqlite:///path.db")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if "://" not in value:
            raise ValueError("must be a broker URL such as redis://127.0.0.1:6379/0")
        return value.strip()

    @model_validator(mode="after")
    def _visibility_outlasts_merges(self) -> Settings:
        # Redis redelivers an unacknowledged task after the visibility timeout: were a merge allowed to run
        # longer, a second worker would start the same job while the first is still on it.
        if self.visibility_timeout_seconds <= self.merge_time_limit_seconds:
            raise ValueError(
                "GRAFT_VISIBILITY_TIMEOUT_SECONDS must be larger than GRAFT_MERGE_TIME_LIMIT_SECONDS "
                f"({self.visibility_timeout_seconds} <= {self.merge_time_limit_seconds})"
            )
        return self

    @field_validator("hub_endpoint")
    @classmethod
    def _check_hub_endpoint(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://", "file://")):
            raise ValueError("must be an http(s):// URL of a Hub-compatible server, or file:///folder")
        return value

    @field_validator("hub_namespace")
    @classmethod
    def _check_hub_namespace(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if not _NAMESPACE.match(value.strip()):
            raise ValueError("must be a Hub user or organisation name (letters, digits, '-', '_', '.')")
        return value.strip()

    @field_validator("hub_token")
    @classmethod
    def _check_hub_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value().strip() == "":
            return None
        return SecretStr(value.get_secret_value().strip())

    @property
    def hub_is_local(self) -> bool:
        """True when publishing goes to the local folder (no Hub configured, or ``file://``)."""
        if self.hub_endpoint is not None:
            return self.hub_endpoint.startswith("file://")
        return self.hub_namespace is None

    @property
    def resolved_hub_endpoint(self) -> str:
        """The Hub-compatible server used for publishing to a remote Hub and for ``hf://`` ingest."""
        if self.hub_endpoint is not None and not self.hub_endpoint.startswith("file://"):
            return self.hub_endpoint
        return DEFAULT_HUB_ENDPOINT

    @property
    def resolved_hub_local_dir(self) -> Path:
        """The folder that plays the Hub when :attr:`hub_is_local`."""
        if self.hub_endpoint is not None and self.hub_endpoint.startswith("file://"):
            return Path(self.hub_endpoint.removeprefix("file://"))
        return self.hub_local_dir if self.hub_local_dir is not None else self.home / "hub"

    @property
    def resolved_hub_namespace(self) -> str | None:
        """The namespace of published repos: the configured one; ``graft`` for the local folder."""
        if self.hub_namespace is not None:
            return self.hub_namespace
        return LOCAL_HUB_NAMESPACE if self.hub_is_local else None

    def hub_token_value(self) -> str | None:
        """The Hub token in clear, for the one call that sends it: the setting, else the token file.

        ``hf auth login``'s own token file is read only when the endpoint is the public Hub, so that a token
        meant for huggingface.co is never sent to another server unless it was configured explicitly.
        """
        if self.hub_token is not None:
            return self.hub_token.get_secret_value()
        candidates: list[Path] = []
        if self.hub_token_file is not None:
            candidates.append(self.hub_token_file.expanduser())
        elif self.resolved_hub_endpoint == DEFAULT_HUB_ENDPOINT:
            home = self.hf_home.expanduser() if self.hf_home is not None else Path.home() / ".cache" / "huggingface"
            candidates.append(home / "token")
        for path in candidates:
            try:
                text = path.read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if text:
                return text
        return None

    def redact(self, text: str) -> str:
        """``text`` with the Hub token (and anything shaped like a Hugging Face token) replaced by ``***``."""
        secret = self.hub_token_value()
        if secret:
            text = text.replace(secret, REDACTED)
        return _HF_TOKEN_SHAPE.sub(REDACTED, text)

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
