"""Chat messages that show a mosaic: remember one when it is posted, find its mosaic when someone
replies to it with a tile coordinate. (platform, channel_id, message_id) is unique.
"""

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Mosaic, MosaicMessage


def remember_message(
    session: Session, platform: str, channel_id: str, message_id: str, mosaic_id: int
) -> None:
    """Record that this message shows this mosaic; recording it again points it at the new one."""
    existing = session.scalar(
        select(MosaicMessage).where(
            MosaicMessage.platform == platform,
            MosaicMessage.channel_id == channel_id,
            MosaicMessage.message_id == message_id,
        )
    )
    if existing is None:
        session.add(MosaicMessage(platform=platform, channel_id=channel_id,
                                  message_id=message_id, mosaic_id=mosaic_id))
    else:
        existing.mosaic_id = mosaic_id


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
