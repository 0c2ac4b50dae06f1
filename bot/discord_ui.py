"""The Discord message components: buttons under mosaics, tiles and waiting questions, the two
modals they open, and the embeds of answers and /help.

Buttons are DynamicItems: their custom_id carries what they act on (a mosaic, a tile, a job), so
they keep working after a restart and no view is kept in memory per message. Each callback
answers its interaction at once (a modal, or a deferral) and leaves the work to the bot.
"""

import re
from typing import TYPE_CHECKING

import discord

if TYPE_CHECKING:
    from bot.discord_bot import TalkMosaicBot

# Discord's limits on an embed (characters).
EMBED_TITLE_LIMIT = 256
EMBED_DESCRIPTION_LIMIT = 4096
EMBED_FIELD_LIMIT = 1024
EMBED_TOTAL_LIMIT = 6000
ANSWER_COLOUR = discord.Colour.green()
FOLLOW_UP_HINT = "Reply to this message to ask a follow-up question."
QUESTION_EXAMPLE = "Which parts of this car pollute?"
# The answer text ends with its own "Sources: [1] ...; [2] ..." paragraph: the embed shows the
# sources as a field instead.
SOURCES_PARAGRAPH = re.compile(r"\n*^Sources: .*\Z", re.M | re.S)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _client(interaction: discord.Interaction) -> "TalkMosaicBot":
    return interaction.client  # type: ignore[return-value]


# Buttons -------------------------------------------------------------------------------------


class PickTile(discord.ui.DynamicItem[discord.ui.Button], template=r"tm:pick:(?P<mosaic>\d+)"):
    """Under a mosaic: opens a modal that asks for a coordinate."""

    def __init__(self, mosaic_id: int):
        super().__init__(discord.ui.Button(
            label="Pick a tile", style=discord.ButtonStyle.primary, custom_id=f"tm:pick:{mosaic_id}"
        ))
        self.mosaic_id = mosaic_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]) -> "PickTile":
        return cls(int(match["mosaic"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(CoordinateModal(interaction.message.id))


class RandomTile(discord.ui.DynamicItem[discord.ui.Button], template=r"tm:random:(?P<mosaic>\d+)"):
    """Under a mosaic: the car behind a tile chosen at random."""

    def __init__(self, mosaic_id: int):
        super().__init__(discord.ui.Button(
            label="Random tile", style=discord.ButtonStyle.secondary,
            custom_id=f"tm:random:{mosaic_id}",
        ))
        self.mosaic_id = mosaic_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]) -> "RandomTile":
        return cls(int(match["mosaic"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await _client(interaction).post_tile(interaction, interaction.message.id, None)


class AskAboutCar(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"tm:car:(?P<mosaic>\d+):(?P<label>[A-Z]{1,3}\d{1,6})",
):
    """Under a tile reply: opens a modal for a question about that car's photo."""

    def __init__(self, mosaic_id: int, label: str):
        super().__init__(discord.ui.Button(
            label="Ask about this car", style=discord.ButtonStyle.primary,
            custom_id=f"tm:car:{mosaic_id}:{label}",
        ))
        self.mosaic_id = mosaic_id
        self.label = label

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]) -> "AskAboutCar":
        return cls(int(match["mosaic"]), match["label"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(CarQuestionModal(self.mosaic_id, self.label))


class CancelQuestion(discord.ui.DynamicItem[discord.ui.Button], template=r"tm:cancel:(?P<job>\d+)"):
    """Under a question's status while it waits in the queue."""

    def __init__(self, job_id: int):
        super().__init__(discord.ui.Button(
            label="Cancel", style=discord.ButtonStyle.danger, custom_id=f"tm:cancel:{job_id}"
        ))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]) -> "CancelQuestion":
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        # A deferred update: nothing shows until the status message is edited.
        await interaction.response.defer()
        await _client(interaction).cancel_question(interaction, self.job_id)


DYNAMIC_ITEMS = (PickTile, RandomTile, AskAboutCar, CancelQuestion)


def mosaic_view(mosaic_id: int, gallery_url: str | None) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(PickTile(mosaic_id))
    view.add_item(RandomTile(mosaic_id))
    if gallery_url:
        view.add_item(discord.ui.Button(label="Open in gallery", url=gallery_url))
    return view


def tile_view(mosaic_id: int, label: str, gallery_url: str | None) -> discord.ui.View:
    view = discord.ui.View(timeout=None).add_item(AskAboutCar(mosaic_id, label))
    if gallery_url:
        view.add_item(discord.ui.Button(label="Open in gallery", url=gallery_url))
    return view


def waiting_view(job_id: int) -> discord.ui.View:
    return discord.ui.View(timeout=None).add_item(CancelQuestion(job_id))


# Modals --------------------------------------------------------------------------------------


class CoordinateModal(discord.ui.Modal, title="Pick a tile"):
    coordinate = discord.ui.Label(
        text="Tile", description="Column letters and row number, e.g. C7 (or row,column: 7,3)",
        component=discord.ui.TextInput(placeholder="C7", min_length=2, max_length=13),
    )

    def __init__(self, mosaic_message_id: int):
        super().__init__(timeout=600)
        self.mosaic_message_id = mosaic_message_id

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await _client(interaction).post_tile(
            interaction, self.mosaic_message_id, self.coordinate.component.value
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await _client(interaction).interaction_failed(interaction, error)


class CarQuestionModal(discord.ui.Modal, title="Ask about this car"):
    question = discord.ui.Label(
        text="Your question",
        component=discord.ui.TextInput(
            style=discord.TextStyle.paragraph, placeholder=QUESTION_EXAMPLE, max_length=1000
        ),
    )

    def __init__(self, mosaic_id: int, label: str):
        super().__init__(timeout=600)
        self.mosaic_id = mosaic_id
        self.label = label

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await _client(interaction).ask_about_tile(
            interaction, self.mosaic_id, self.label, self.question.component.value
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await _client(interaction).interaction_failed(interaction, error)


# Embeds --------------------------------------------------------------------------------------


def answer_embed(question: str, text: str, sources: list[dict]) -> discord.Embed:
    """An answer: the question as the title, the answer as the description and its numbered
    sources as a field, within Discord's limits (description 4,096 characters, a field 1,024,
    the whole embed 6,000)."""
    body = SOURCES_PARAGRAPH.sub("", text).rstrip() if sources else text
    embed = discord.Embed(
        title=_cut(" ".join(question.split()), EMBED_TITLE_LIMIT),
        description=_cut(body, EMBED_DESCRIPTION_LIMIT),
        colour=ANSWER_COLOUR,
    )
    if sources:
        lines = [
            f"[{source.get('n', number)}] {source.get('title') or 'source'}"
            + (f" — {source['source']}" if source.get("source") else "")
            for number, source in enumerate(sources, start=1)
        ]
        embed.add_field(name="Sources", value=_cut("\n".join(lines), EMBED_FIELD_LIMIT),
                        inline=False)
    embed.set_footer(text=FOLLOW_UP_HINT)
    excess = len(embed) - EMBED_TOTAL_LIMIT
    if excess > 0:
        embed.description = _cut(embed.description, len(embed.description) - excess)
    return embed


HELP = (
    ("/mosaic build target name [columns]",
     "Recompose an image from the car photos; the message shows the progress, then the "
     "mosaic."),
    ("/mosaic show name · /mosaic list", "Show one mosaic (names autocomplete) or list them."),
    ("Pick a tile · Random tile · reply C7",
     "Under a mosaic: the original car photo behind a tile, with what is known about the car. "
     "/mosaic tile name coordinate does the same."),
    ("Ask about this car", "Under a tile: ask a question about that car's photo."),
    ("/ask photo question · mention me with a photo · Apps > Ask TalkMosaic",
     "A sourced answer about a car photo, e.g. \"Which parts of this car pollute?\". Your "
     "question waits in a queue (Cancel takes it back); reply to the answer to follow up."),
)


def help_embed(gallery_url: str | None) -> discord.Embed:
    embed = discord.Embed(
        title="TalkMosaic",
        description="Photomosaics of endangered animals made of car photos, and answers about "
                    "cars and their environmental impact.",
        colour=ANSWER_COLOUR,
    )
    for name, value in HELP:
        embed.add_field(name=name, value=value, inline=False)
    if gallery_url:
        embed.add_field(name="Gallery", value=gallery_url, inline=False)
    return embed
