"""What every entry point opens once: settings, the database and the media store."""

from dataclasses import dataclass

from core.settings import Settings
from storage.db import Database
from storage.media import MediaStore


@dataclass
class AppContext:
    settings: Settings
    db: Database
    media: MediaStore

    @classmethod
    def open(cls, settings: Settings | None = None) -> "AppContext":
        settings = settings or Settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, Database.open(settings.db_url), MediaStore(settings.media_dir))

    def close(self) -> None:
        self.db.close()
