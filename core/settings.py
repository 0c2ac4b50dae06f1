"""The one settings object, read from the environment and `.env`, passed to whoever needs it."""

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from core.vlm.config import PrBlockConfig, SAQConfig
from storage.media import check_media_url


class Settings(BaseSettings):
    """Everything configurable. Nested values use `__`, e.g. `ATTENTION__ALPHA=2`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
    )

    data_dir: Path = Field(
        Path("data"), validation_alias=AliasChoices("TALKMOSAIC_DATA_DIR", "data_dir")
    )
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    # Media store: unset = the folder data_dir/media; a path or file://; postgresql://...
    # (media in the database, shared by every host); s3://BUCKET/PREFIX?endpoint_url=...
    media_url: str | None = Field(None, validation_alias=AliasChoices("MEDIA_URL", "media_url"))
    # Leftovers younger than this are spared by the sweep: a writer may still be working.
    media_sweep_after_min: float = 60.0
    max_image_pixels: int = 40_000_000
    max_upload_bytes: int = 20 * 1024 * 1024
    preview_max_bytes: int = 8 * 1024 * 1024

    # Chat platforms: an adapter starts only when its tokens are present.
    discord_token: SecretStr | None = None
    discord_guild_id: int | None = None
    discord_message_content: bool = False
    # Shards (AutoShardedClient) from about 2,500 servers on: DISCORD_SHARDED=true takes
    # Discord's recommended count, DISCORD_SHARD_COUNT=N sets it (and implies sharding).
    discord_sharded: bool = False
    discord_shard_count: int | None = None
    # A plain message cannot be ephemeral: error replies to messages delete themselves after this.
    discord_error_delete_after_s: float = 60.0
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_host: str = "127.0.0.1"
    slack_port: int = Field(3000, ge=0, le=65535)
    # The Web API, and the only hosts the bot token is sent to for `url_private` downloads
    # (GovSlack: https://slack-gov.com/api/ and files.slack-gov.com).
    slack_api_url: str = "https://slack.com/api/"
    slack_file_hosts: list[str] = ["files.slack.com"]
    cooldown_s: float = 5.0

    # Web gallery: loopback only unless changed on purpose.
    gallery_host: str = "127.0.0.1"
    gallery_port: int = Field(8080, ge=0, le=65535)
    # Where people reach the gallery (behind a proxy), e.g. https://mosaics.example.org: chat
    # messages then link each mosaic's page. Empty: no link.
    gallery_public_url: str | None = None
    # Seals the gallery's session cookies. Unset: a random key kept beside the database, so
    # restarts keep sessions; set the same value on every host behind one address.
    gallery_secret: SecretStr | None = None
    # Tile look-ups (JSON and photo) kept in memory, bounded in MB; 0 turns the cache off.
    gallery_tile_cache_mb: float = 64.0
    gallery_tile_cache_ttl_s: float = 600.0

    # Q&A jobs and answering.
    qa_backend: Literal["embedded", "vlm"] = "embedded"
    vlm_model_path: Path | None = None
    vlm_quantization: Literal["none", "4bit", "8bit"] = "none"
    # Visual tokens one photo may cost the VLM (its processor's image size is lowered to fit).
    vlm_max_image_tokens: int = Field(1024, ge=1)
    # extract: the facts' own sentences ranked by meaning and retrieval score (no language model:
    # measured as good and 8x faster on the CPU); rank: the embedded model's log-probability
    # joins the ranking; write: it writes, and only sentences the claim check supports are shown.
    qa_mode: Literal["extract", "rank", "write"] = "extract"
    # Live conversations' KV caches (SAQ-compressed) kept for follow-up questions.
    conversation_cache_mb: int = 256
    max_question_chars: int = 1000
    queue_max_pending: int = 50
    queue_per_user: int = 2
    job_timeout_s: float = 120.0
    # On SIGTERM/SIGINT the running answer gets this long to finish; then it is handed back to
    # the queue (another worker, or the next start, takes it up).
    shutdown_grace_s: float = 10.0
    # How often the gateway looks for answers finished by any worker (another host's too) that
    # are still to be posted to the chat that asked.
    job_poll_s: float = Field(2.0, gt=0)

    attention: PrBlockConfig = PrBlockConfig()
    kv_cache: SAQConfig = SAQConfig()

    @field_validator("media_url")
    @classmethod
    def _known_media_backend(cls, value):
        check_media_url(value)
        return value

    @field_validator("kv_cache", mode="before")
    @classmethod
    def _bits_from_text(cls, value):
        # Nested dataclass fields reach us as raw text: "8,4,2" and "[8,4,2]" both mean (8, 4, 2).
        if isinstance(value, dict) and isinstance(value.get("bits"), str):
            bits = value["bits"].strip("[]() ").split(",")
            value = {**value, "bits": tuple(int(b) for b in bits if b.strip())}
        return value

    @field_validator("attention", mode="before")
    @classmethod
    def _dense_heads_from_text(cls, value):
        # "auto": the model's calibrated heads; "none": no dense head; "7:2,18:2": these.
        if isinstance(value, dict) and isinstance(value.get("dense_heads"), str):
            text = value["dense_heads"].strip().lower()
            if text == "auto":
                heads = None
            else:
                listed = "" if text == "none" else text
                pairs = [pair.split(":") for pair in listed.split(",") if pair.strip()]
                if any(len(pair) != 2 for pair in pairs):
                    raise ValueError(
                        f"ATTENTION__DENSE_HEADS is auto, none or layer:head pairs, not {text!r}"
                    )
                heads = tuple((int(layer), int(head)) for layer, head in pairs)
            value = {**value, "dense_heads": heads}
        if isinstance(value, dict) and isinstance(value.get("buckets"), str):
            # "1024,2048" and "[1024,2048]" both mean (1024, 2048).
            lengths = value["buckets"].strip("[]() ").split(",")
            value = {**value, "buckets": tuple(int(b) for b in lengths if b.strip())}
        return value

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"

    @property
    def db_url(self) -> str:
        """DATABASE_URL if given, else a SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'talkmosaic.db').resolve()}"


class BadSettings(Exception):
    """A setting in the environment or `.env` that does not parse; `str()` is one sentence."""


def load_settings() -> Settings:
    """Settings() for an entry point: a value that does not parse raises BadSettings naming the
    variable, e.g. "GALLERY_PORT='abc' is not valid (input should be a valid integer...)"."""
    try:
        return Settings()
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            name = "__".join(str(part) for part in problem["loc"]).upper()
            # URLs (DATABASE_URL, MEDIA_URL) may carry a password: never echoed either.
            secret = any(word in name for word in ("TOKEN", "SECRET", "PASSWORD", "_URL"))
            shown = "" if secret else f"={problem.get('input')!r}"
            message = problem["msg"][:1].lower() + problem["msg"][1:]
            problems.append(f"{name}{shown} is not valid ({message})")
        raise BadSettings("; ".join(problems) + ".") from None
    except SettingsError as error:
        # A list or nested value that is not JSON, e.g. SLACK_FILE_HOSTS=files.slack.com.
        raise BadSettings(f"{str(error).rstrip('.')}: lists are JSON, e.g. "
                          '["files.slack.com"].') from None
