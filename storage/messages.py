"""Chat messages that show a mosaic or an answer: remember one when it is posted, then find its
mosaic when someone replies with a tile coordinate, or its job when someone asks a follow-up.
(platform, channel_id, message_id) is unique in each table.
"""

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import AnswerMessage, Mosaic, MosaicMessage


def remember_message(
    session: Session, platform: str, channel_id: str, message_id: str, mosaic_id: int
) -> None:
    """Record that this message shows this mosaic; recording it again points it at the new one."""
    existing = _message_row(session, MosaicMessage, platform, channel_id, message_id)
    if existing is None:
        session.add(MosaicMessage(platform=platform, channel_id=channel_id,
                                  message_id=message_id, mosaic_id=mosaic_id))
    else:
        existing.mosaic_id = mosaic_id


def _message_row(session: Session, table, platform: str, channel_id: str, message_id: str):
    """The row of `table` (MosaicMessage or AnswerMessage) for this chat message, or None."""
    return session.scalar(
        select(table).where(
            table.platform == platform,
            table.channel_id == channel_id,
            table.message_id == message_id,
        )
    )


def mosaic_for_message(
    session: Session, platform: str, channel_id: str, message_id: str
) -> Mosaic | None:
    """The mosaic a message shows, or None if it shows none (or its mosaic was deleted)."""
    query = (
        select(Mosaic)
        .join(MosaicMessage, MosaicMessage.mosaic_id == Mosaic.id)
        .where(
            MosaicMessage.platform == platform,
            MosaicMessage.channel_id == channel_id,
            MosaicMessage.message_id == message_id,
        )
    )
    return session.scalar(query)


def remember_answer(
    session: Session, platform: str, channel_id: str, message_id: str, job_id: int
) -> None:
    """Record that this message shows this job's answer; recording it again points it at the new
    job (a Slack thread shows its latest answer)."""
    existing = _message_row(session, AnswerMessage, platform, channel_id, message_id)
    if existing is None:
        session.add(AnswerMessage(platform=platform, channel_id=channel_id,
                                  message_id=message_id, job_id=job_id))
    else:
        existing.job_id = job_id


def job_for_answer_message(
    session: Session, platform: str, channel_id: str, message_id: str
) -> int | None:
    """The id of the job whose answer a message shows, or None if it shows none."""
    return session.scalar(
        select(AnswerMessage.job_id).where(
            AnswerMessage.platform == platform,
            AnswerMessage.channel_id == channel_id,
            AnswerMessage.message_id == message_id,
        )
    )
