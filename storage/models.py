"""The tables: car photos, mosaics and their tiles, Q&A jobs and the follow-ups that continue
them, and the chat messages that show a mosaic or an answer."""

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# A finished job whose outcome no chat adapter has posted yet (ix_jobs_unposted's rows).
UNPOSTED = "posted_at IS NULL AND status IN ('done', 'failed', 'cancelled', 'timed_out')"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Car(Base):
    """One car photo of the tile library: the original lives in the media store."""

    __tablename__ = "cars"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    media_key: Mapped[str] = mapped_column(String(64))
    file_name: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    byte_size: Mapped[int] = mapped_column(Integer)
    thumbnail: Mapped[bytes] = mapped_column(LargeBinary)
    # k x k grid of mean CIELAB colours, float32, row-major, shape (k, k, 3).
    features: Mapped[bytes] = mapped_column(LargeBinary)
    feature_grid: Mapped[int] = mapped_column(Integer)
    make: Mapped[str | None] = mapped_column(String(80))
    model: Mapped[str | None] = mapped_column(String(120))
    year: Mapped[int | None] = mapped_column(Integer)
    fuel: Mapped[str | None] = mapped_column(String(40))
    co2_g_km: Mapped[float | None] = mapped_column(Float)
    emission_standard: Mapped[str | None] = mapped_column(String(40))
    source: Mapped[str | None] = mapped_column(String(255))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Mosaic(Base):
    """A built mosaic; names are unique within an owner scope (a guild, a workspace, the CLI)."""

    __tablename__ = "mosaics"
    __table_args__ = (UniqueConstraint("owner_scope", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    owner_scope: Mapped[str] = mapped_column(String(120), default="local")
    target_sha256: Mapped[str] = mapped_column(String(64))
    target_media_key: Mapped[str | None] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    tile_px: Mapped[int] = mapped_column(Integer)
    render_media_key: Mapped[str] = mapped_column(String(64))
    preview_media_key: Mapped[str | None] = mapped_column(String(64))
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    created_by: Mapped[str | None] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    tiles: Mapped[list["Tile"]] = relationship(
        back_populates="mosaic", cascade="all, delete-orphan", passive_deletes=True
    )


class Tile(Base):
    """One cell of a mosaic: which car fills it, where, and how well it matched."""

    __tablename__ = "tiles"
    __table_args__ = (UniqueConstraint("mosaic_id", "row", "col"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mosaic_id: Mapped[int] = mapped_column(ForeignKey("mosaics.id", ondelete="CASCADE"))
    row: Mapped[int] = mapped_column(Integer)
    col: Mapped[int] = mapped_column(Integer)
    car_id: Mapped[int | None] = mapped_column(ForeignKey("cars.id", ondelete="SET NULL"))
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)

    mosaic: Mapped[Mosaic] = relationship(back_populates="tiles")
    car: Mapped[Car | None] = relationship()


class Job(Base):
    """A queued question about a photo; persisted so a restart loses nothing."""

    __tablename__ = "jobs"
    # Per-user limit check: count one user's pending jobs without scanning the table.
    # The gateway's poll for outcomes to post reads only the few finished, unposted rows.
    __table_args__ = (
        Index("ix_jobs_user_status", "user_id", "status"),
        Index("ix_jobs_unposted", "platform", sqlite_where=text(UNPOSTED),
              postgresql_where=text(UNPOSTED)),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="ask")
    platform: Mapped[str] = mapped_column(String(20))
    user_id: Mapped[str] = mapped_column(String(120))
    # Where to answer: channel, thread, message to reply to; opaque per platform.
    reply_to: Mapped[dict] = mapped_column(JSON, default=dict)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    image_media_key: Mapped[str | None] = mapped_column(String(64))
    question: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    answer: Mapped[str | None] = mapped_column(Text)
    sources: Mapped[list | None] = mapped_column(JSON)
    timings: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(80))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a chat adapter posted the outcome (the answer, or why there is none), whichever
    # process's worker finished the job; NULL until then.
    posted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FollowUp(Base):
    """A job that continues an answered one: a follow-up question in the same conversation.

    A table of its own, not a column of `jobs`, because it came before migrations did (when
    deployed databases gained only new tables on start). A first question has no row here."""

    __tablename__ = "follow_ups"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    parent_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))


class MosaicMessage(Base):
    """A chat message that shows a mosaic, so a reply such as `C7` finds its mosaic."""

    __tablename__ = "mosaic_messages"
    __table_args__ = (UniqueConstraint("platform", "channel_id", "message_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[str] = mapped_column(String(20))
    channel_id: Mapped[str] = mapped_column(String(120))
    message_id: Mapped[str] = mapped_column(String(120))
    mosaic_id: Mapped[int] = mapped_column(ForeignKey("mosaics.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AnswerMessage(Base):
    """A chat message that shows a job's answer, so a reply to it becomes a follow-up question.

    On Slack the message is the thread (its ts) and points at the thread's latest answer."""

    __tablename__ = "answer_messages"
    __table_args__ = (UniqueConstraint("platform", "channel_id", "message_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[str] = mapped_column(String(20))
    channel_id: Mapped[str] = mapped_column(String(120))
    message_id: Mapped[str] = mapped_column(String(120))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
