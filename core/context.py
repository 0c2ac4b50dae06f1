"""What every entry point opens once: settings, the database and the media store."""

from dataclasses import dataclass
from datetime import timedelta

from core.settings import Settings
from storage.db import Database
from storage.media import MediaStore, open_media_store


@dataclass
class AppContext:
    settings: Settings
    db: Database
    media: MediaStore

    @classmethod
    def open(cls, settings: Settings | None = None) -> "AppContext":
        settings = settings or Settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        media = open_media_store(settings.media_url, settings.media_dir)
        media.sweep_incomplete(older_than=timedelta(minutes=settings.media_sweep_after_min))
        return cls(settings, Database.open(settings.db_url), media)

    def close(self) -> None:
        self.db.close()
        self.media.close()
