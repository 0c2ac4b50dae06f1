"""The Discord adapter (discord.py 2.x app commands): parse, call bot.commands, send.

Every interaction is deferred first (Discord wants an answer within 3 s); the work follows.
"""

import contextlib
import io
import logging

import discord
from discord import app_commands

from bot.commands import (
    NOT_AN_IMAGE,
    SORRY,
    Commands,
    JobUpdates,
    PostedAnswer,
    Reply,
    check_attachment,
    error_reply,
    is_coordinate,
)
from core.errors import BadImage, UserError
from storage.models import Job

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
DEFAULT_QUESTION = "What is this car, and how could its environmental impact be lowered?"


def scope_of(guild_id: int | None, user_id: int) -> str:
    return f"discord:{guild_id}" if guild_id else f"discord:dm:{user_id}"


def _files(reply: Reply) -> list[discord.File]:
    return [discord.File(io.BytesIO(data), filename=name) for name, data in reply.files]


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def _first_image(attachments: list[discord.Attachment]) -> discord.Attachment | None:
    for attachment in attachments:
        if (attachment.content_type or "").startswith("image/"):
            return attachment
    return None


class TalkMosaicBot(discord.Client):
    def __init__(
        self,
        commands: Commands,
        updates: JobUpdates,
        guild_id: int | None = None,
        message_content: bool = False,
        **options,
    ):
        intents = discord.Intents.default()
        # Privileged: without it, replies and mentions still carry text when they ping the bot.
        intents.message_content = message_content
        super().__init__(intents=intents, **options)
        self.commands = commands
        self.updates = updates
        self.guild_id = guild_id
        self.settings = commands.ctx.settings
        self.tree = app_commands.CommandTree(self)
        self.tree.add_command(MosaicGroup(self))
        self.tree.add_command(app_commands.Command(
            name="ask", description="Ask a question about a car photo.", callback=self._ask_command
        ))
        self.tree.add_command(app_commands.ContextMenu(name="Ask TalkMosaic",
                                                       callback=self._ask_about_message))
        self.tree.on_error = self._on_tree_error
        updates.add_fallback(PLATFORM, self._answer_without_status)

    async def setup_hook(self) -> None:
        # A guild sync shows the commands at once (development); a global one can take an hour.
        if self.guild_id:
            guild = discord.Object(self.guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    # Slash commands -------------------------------------------------------------------------

    @app_commands.describe(photo="A photo of a car", question="What you want to know about it")
    async def _ask_command(
        self, interaction: discord.Interaction, photo: discord.Attachment, question: str
    ) -> None:
        await interaction.response.defer(thinking=True)
        await self._ask(interaction, photo, question)

    async def _ask_about_message(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        await interaction.response.defer(thinking=True)
        photo = _first_image(message.attachments)
        if photo is None:
            await send_followup(interaction, error_reply(BadImage(
                "That message has no photo: use Ask TalkMosaic on a message with a car photo."
            )))
            return
        await self._ask(interaction, photo, _question_text(message.content, self.user)
                        or DEFAULT_QUESTION)

    async def _ask(
        self, interaction: discord.Interaction, photo: discord.Attachment, question: str
    ) -> None:
        try:
            image = await read_attachment(photo, self.settings.max_upload_bytes)
        except UserError as error:
            await send_followup(interaction, error_reply(error))
            return
        reply_to = {"channel_id": str(interaction.channel_id), "user_id": str(interaction.user.id)}

        async def show(text: str) -> "InteractionStatus":
            await interaction.edit_original_response(content=text)
            return InteractionStatus(self, interaction)

        reply = await self.updates.follow(
            self.commands.ask(PLATFORM, str(interaction.user.id), reply_to, image, question), show
        )
        if reply.job_id is None:
            await send_followup(interaction, reply)

    async def _on_tree_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.CommandInvokeError) and isinstance(
            error.original, UserError
        ):
            text = str(error.original)
        else:
            log.error("command failed", exc_info=error)
            text = SORRY
        if interaction.response.is_done():
            await send_followup(interaction, Reply(text, ephemeral=True))
        else:
            await interaction.response.send_message(text, ephemeral=True)

    # Plain messages: "C7" replies, follow-ups to answers, photo + question mentions ----------

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot:
            return
        replied_to = message.reference.message_id if message.reference else None
        if replied_to and is_coordinate(message.content):
            limit = min(message_filesize_limit(message), self.settings.preview_max_bytes)
            reply = await self.commands.tile_for_message(
                PLATFORM, str(message.channel.id), str(replied_to), message.content, limit
            )
            if reply is not None:
                await message.reply(_clip(reply.text), files=_files(reply), mention_author=False)
            return
        if replied_to:
            parent = await self.commands.follow_up_for_message(
                PLATFORM, str(message.channel.id), str(replied_to)
            )
            if parent is not None:
                await self._ask_in_reply(message, follow_up_of=parent)
                return
        if self.user is not None and self.user in message.mentions:
            await self._ask_in_reply(message)

    async def _ask_in_reply(
        self, message: discord.Message, follow_up_of: int | None = None
    ) -> None:
        """Queue the message's question, about its photo (a follow-up may have none: it asks
        about its conversation's photo), and answer it in reply."""
        photo = _first_image(message.attachments)
        if photo is None and (message.attachments or follow_up_of is None):
            if message.attachments:
                await message.reply(NOT_AN_IMAGE, mention_author=False)
            return
        image = None
        if photo is not None:
            try:
                image = await read_attachment(photo, self.settings.max_upload_bytes)
            except UserError as error:
                await message.reply(str(error), mention_author=False)
                return
        question = _question_text(message.content, self.user)
        reply_to = {"channel_id": str(message.channel.id), "message_id": str(message.id),
                    "user_id": str(message.author.id)}

        async def show(text: str) -> "MessageStatus":
            return MessageStatus(message, await message.reply(text, mention_author=False))

        reply = await self.updates.follow(
            self.commands.ask(PLATFORM, str(message.author.id), reply_to, image, question,
                              follow_up_of=follow_up_of),
            show,
        )
        if reply.job_id is None:
            await message.reply(reply.text, mention_author=False)

    async def on_error(self, event_method: str, /, *args, **kwargs) -> None:
        """An event handler failed unexpectedly: log it, and tell the message's author."""
        log.exception("%s failed", event_method)
        message = args[0] if args else None
        if event_method == "on_message" and isinstance(message, discord.Message):
            with contextlib.suppress(discord.HTTPException):
                await message.reply(SORRY, mention_author=False)

    async def _answer_without_status(self, job: Job, text: str) -> PostedAnswer | None:
        """Post an answer whose status message this process never saw (e.g. after a restart)."""
        channel_id = (job.reply_to or {}).get("channel_id")
        if not channel_id:
            return None
        user = (job.reply_to or {}).get("user_id")
        prefix = f"<@{user}> " if user else ""
        posted = await self.get_partial_messageable(int(channel_id)).send(_clip(prefix + text))
        return _posted(channel_id, posted)


class MosaicGroup(app_commands.Group):
    """Photomosaics of an animal made of car photos."""

    def __init__(self, bot: TalkMosaicBot):
        super().__init__(name="mosaic", description="Photomosaics made of car photos.")
        self.bot = bot

    @app_commands.command(description="Build a mosaic of an image from the car photos.")
    @app_commands.describe(target="The image to recompose", name="A name for the mosaic",
                           columns="Tiles across (default 60)")
    async def build(
        self,
        interaction: discord.Interaction,
        target: discord.Attachment,
        name: str,
        columns: app_commands.Range[int, 4, 300] | None = None,
    ) -> None:
        await interaction.response.defer(thinking=True)
        try:
            data = await read_attachment(target, self.bot.settings.max_upload_bytes)
        except UserError as error:
            await send_followup(interaction, error_reply(error))
            return
        reply = await self.bot.commands.build(
            _scope(interaction), _user(interaction), data, name, columns, _limit(interaction)
        )
        await self._post(interaction, reply)

    @app_commands.command(description="Show a mosaic; reply to it with a tile such as C7.")
    @app_commands.describe(name="The mosaic's name")
    async def show(self, interaction: discord.Interaction, name: str) -> None:
        await interaction.response.defer(thinking=True)
        reply = await self.bot.commands.show(
            _scope(interaction), _user(interaction), name, _limit(interaction)
        )
        await self._post(interaction, reply)

    @app_commands.command(name="list", description="List the mosaics of this server.")
    async def list_(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await send_followup(interaction, await self.bot.commands.mosaics(_scope(interaction)))

    @app_commands.command(description="The car photo behind one tile of a mosaic.")
    @app_commands.describe(name="The mosaic's name", coordinate="A tile such as C7, or row,col")
    async def tile(self, interaction: discord.Interaction, name: str, coordinate: str) -> None:
        await interaction.response.defer(thinking=True)
        reply = await self.bot.commands.tile(
            _scope(interaction), name, coordinate, _limit(interaction)
        )
        await send_followup(interaction, reply)

    async def _post(self, interaction: discord.Interaction, reply: Reply) -> None:
        message = await send_followup(interaction, reply)
        if reply.mosaic_id is not None and message is not None:
            await self.bot.commands.remember(
                PLATFORM, str(interaction.channel_id), str(message.id), reply.mosaic_id
            )


class InteractionStatus:
    """A job's status shown as the deferred response of an interaction; the answer follows up.

    Interaction tokens last 15 minutes: after that the answer goes to the channel instead."""

    def __init__(self, bot: TalkMosaicBot, interaction: discord.Interaction):
        self.bot = bot
        self.interaction = interaction

    async def update(self, text: str) -> None:
        if not self.interaction.is_expired():
            await self.interaction.edit_original_response(content=_clip(text))

    async def finish(self, text: str) -> PostedAnswer:
        if not self.interaction.is_expired():
            posted = await self.interaction.followup.send(_clip(text), wait=True)
        else:
            channel = self.bot.get_partial_messageable(self.interaction.channel_id)
            posted = await channel.send(_clip(f"<@{self.interaction.user.id}> {text}"))
        return _posted(self.interaction.channel_id, posted)


class MessageStatus:
    """A job's status shown as the bot's reply to a message; the answer replies to the asker."""

    def __init__(self, asked: discord.Message, status: discord.Message):
        self.asked = asked
        self.status = status

    async def update(self, text: str) -> None:
        await self.status.edit(content=_clip(text))

    async def finish(self, text: str) -> PostedAnswer:
        return _posted(self.asked.channel.id, await self.asked.reply(_clip(text)))


def _posted(channel_id: int | str, message: discord.Message) -> PostedAnswer:
    return PostedAnswer(PLATFORM, str(channel_id), str(message.id))


async def send_followup(
    interaction: discord.Interaction, reply: Reply
) -> discord.WebhookMessage | None:
    """Follow a deferred interaction up. The "thinking" message is public, so an ephemeral
    reply deletes it first: otherwise the first follow-up would inherit its visibility."""
    if reply.ephemeral:
        await interaction.delete_original_response()
        await interaction.followup.send(_clip(reply.text), ephemeral=True)
        return None
    return await interaction.followup.send(_clip(reply.text), files=_files(reply), wait=True)


async def read_attachment(attachment: discord.Attachment, max_bytes: int) -> bytes:
    check_attachment(attachment.content_type, attachment.size, max_bytes)
    try:
        return await attachment.read()
    except discord.HTTPException as error:
        raise BadImage("That attachment could not be downloaded; please send it again.") from error


def message_filesize_limit(message: discord.Message) -> int:
    guild = message.guild
    return guild.filesize_limit if guild else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES


def _question_text(content: str, me: discord.ClientUser | None) -> str:
    if me is not None:
        content = content.replace(f"<@{me.id}>", " ").replace(f"<@!{me.id}>", " ")
    return " ".join(content.split())


def _scope(interaction: discord.Interaction) -> str:
    return scope_of(interaction.guild_id, interaction.user.id)


def _user(interaction: discord.Interaction) -> str:
    return f"{PLATFORM}:{interaction.user.id}"


def _limit(interaction: discord.Interaction) -> int:
    settings = interaction.client.commands.ctx.settings
    return min(interaction.filesize_limit, settings.preview_max_bytes)


