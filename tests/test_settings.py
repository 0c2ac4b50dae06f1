"""Settings: one object from the environment and `.env`; `.env.example` documents every field."""

import re
from pathlib import Path

from core.settings import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def _example_names() -> set[str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    return {m.group(1) for line in lines if (m := re.match(r"^([A-Z0-9_]+)=", line))}


def _env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        top = alias.choices[0] if alias is not None else name.upper()
        annotation = field.annotation
        if hasattr(annotation, "__dataclass_fields__"):
            names |= {f"{top}__{sub.upper()}" for sub in annotation.__dataclass_fields__}
        else:
            names.add(top)
    return names


def test_env_example_lists_every_setting():
    assert _example_names() == _env_names()


def test_env_example_values_are_the_defaults(monkeypatch):
    for name in _env_names():
        monkeypatch.delenv(name, raising=False)
    from_example = Settings(_env_file=ENV_EXAMPLE)
    defaults = Settings(_env_file=None)
    assert from_example.model_dump() == defaults.model_dump()


def test_nested_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTENTION__ALPHA", "2.5")
    monkeypatch.setenv("KV_CACHE__BITS", "8,4")
    settings = Settings(_env_file=None)
    assert settings.attention.alpha == 2.5
    assert settings.kv_cache.bits == (8, 4)


def test_tokens_never_appear_in_the_repr(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "very-secret-token")
    settings = Settings(_env_file=None)
    assert "very-secret-token" not in repr(settings)
    assert settings.discord_token.get_secret_value() == "very-secret-token"


def test_dense_heads_are_auto_none_or_layer_head_pairs(monkeypatch):
    import pytest

    assert Settings(_env_file=None).attention.dense_heads is None
    monkeypatch.setenv("ATTENTION__DENSE_HEADS", "7:2, 18:2")
    assert Settings(_env_file=None).attention.dense_heads == ((7, 2), (18, 2))
    monkeypatch.setenv("ATTENTION__DENSE_HEADS", "none")
    assert Settings(_env_file=None).attention.dense_heads == ()
    monkeypatch.setenv("ATTENTION__DENSE_HEADS", "7")
    with pytest.raises(ValueError, match="layer:head"):
        Settings(_env_file=None)
