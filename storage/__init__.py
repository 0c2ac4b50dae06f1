"""Persistence: SQLAlchemy models and engine set-up, small repositories, the media store."""
