"""The Discord adapter (discord.py 2.x app commands and components): parse, call bot.commands,
send.

Every interaction is answered within Discord's 3 s: at once when the answer costs nothing (help,
autocomplete, opening a modal), otherwise deferred first, with the work following. Errors on
interactions are ephemeral; a plain message cannot be, so error replies to messages delete
themselves after DISCORD_ERROR_DELETE_AFTER_S.
"""

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import discord
from discord import app_commands

from bot.commands import (
    NOT_AN_IMAGE,
    SORRY,
    Commands,
    JobStatus,
    JobUpdates,
    PostedAnswer,
    Reply,
    check_attachment,
    error_reply,
    is_coordinate,
)
from bot.discord_ui import (
    DYNAMIC_ITEMS,
    answer_embed,
    help_embed,
    mosaic_view,
    tile_view,
    waiting_view,
)
from core.errors import BadImage, UserError
from core.gallery import tile_url
from core.images import SNIFF_BYTES, sniffed_image_type
from core.settings import Settings
from storage.models import Job

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
DEFAULT_QUESTION = "What is this car, and how could its environmental impact be lowered?"
NO_PHOTO_HERE = (
    "That message has no photo: post a car photo and mention me with your question, or use /ask."
)
DOWNLOAD_FAILED = "That attachment could not be downloaded; please send it again."
DOWNLOAD_CHUNK = 64 * 1024


def scope_of(guild_id: int | None, user_id: int) -> str:
    return f"discord:{guild_id}" if guild_id else f"discord:dm:{user_id}"


def _files(reply: Reply) -> list[discord.File]:
    return [discord.File(io.BytesIO(data), filename=name) for name, data in reply.files]


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def _first_image(attachments: list[discord.Attachment]) -> discord.Attachment | None:
    """The first attachment that may be a photo: one that says it is an image, or says nothing
    (its bytes are sniffed when it is downloaded)."""
    for attachment in attachments:
        content_type = attachment.content_type
        if content_type is None or content_type.lower().startswith("image/"):
            return attachment
    return None


def _tile_view(reply: Reply, settings: Settings) -> discord.ui.View | None:
    """Under a tile's car: "Ask about this car", and the gallery opened on that tile when
    GALLERY_PUBLIC_URL is set."""
    if not reply.tile:
        return None
    return tile_view(*reply.tile, tile_url(settings, *reply.tile))


def over_limit(max_bytes: int) -> BadImage:
    return BadImage(f"That image is over the {max_bytes // (1024 * 1024)} MiB upload limit.")


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
        self._downloads: aiohttp.ClientSession | None = None
        self.tree = app_commands.CommandTree(self)
        self.tree.add_command(MosaicGroup(self))
        self.tree.add_command(app_commands.Command(
            name="ask", description="Ask a question about a car photo.", callback=self._ask_command
        ))
        self.tree.add_command(app_commands.Command(
            name="help", description="What TalkMosaic does and how to use it.",
            callback=self._help_command,
        ))
        self.tree.add_command(app_commands.ContextMenu(name="Ask TalkMosaic",
                                                       callback=self._ask_about_message))
        self.tree.on_error = self._on_tree_error
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        updates.add_fallback(PLATFORM, self._answer_without_status)

    async def setup_hook(self) -> None:
        # A guild sync shows the commands at once (development); a global one can take an hour.
        if self.guild_id:
            guild = discord.Object(self.guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    async def close(self) -> None:
        if self._downloads is not None:
            await self._downloads.close()
        await super().close()

    # Slash commands and the message menu -------------------------------------------------------

    async def _help_command(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            embed=help_embed(self.settings.gallery_public_url), ephemeral=True
        )

    @app_commands.describe(photo="A photo of a car", question="What you want to know about it")
    async def _ask_command(
        self, interaction: discord.Interaction, photo: discord.Attachment, question: str
    ) -> None:
        await interaction.response.defer(thinking=True)
        await self._ask(interaction, photo, question)

    async def _ask_about_message(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        """The message menu's "Ask TalkMosaic": the same as mentioning the bot in that message."""
        await interaction.response.defer(thinking=True)
        try:
            photo, question = self._photo_and_question(message)
        except UserError as error:
            await send_followup(interaction, error_reply(error))
            return
        await self._ask(interaction, photo, question)

    async def _ask(
        self, interaction: discord.Interaction, photo: discord.Attachment, question: str
    ) -> None:
        try:
            image = await self.download(photo)
        except UserError as error:
            await send_followup(interaction, error_reply(error))
            return
        await self._queue_for_interaction(interaction, self.commands.ask(
            PLATFORM, str(interaction.user.id), _reply_to(interaction), image, question
        ))

    async def _queue_for_interaction(
        self, interaction: discord.Interaction, asking: Awaitable[Reply]
    ) -> None:
        """Queue a question asked through an interaction: its deferred response becomes the
        status (with a Cancel button while it waits); the answer follows up."""

        async def show(text: str, job_id: int) -> "InteractionStatus":
            status = InteractionStatus(self, interaction, job_id)
            await status.show(text)
            return status

        reply = await self._queue(asking, show)
        if reply.job_id is None:
            await send_followup(interaction, reply)

    async def _queue(
        self, asking: Awaitable[Reply], show: Callable[[str, int], Awaitable[JobStatus]]
    ) -> Reply:
        """JobUpdates.follow, with the queued job's id handed to `show(text, job_id)`."""
        job_ids: list[int] = []

        async def ask() -> Reply:
            reply = await asking
            job_ids.append(reply.job_id)
            return reply

        return await self.updates.follow(ask(), lambda text: show(text, job_ids[0]))

    async def _on_tree_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.CommandInvokeError):
            error = error.original
        await self.interaction_failed(interaction, error)

    async def interaction_failed(self, interaction: discord.Interaction, error: Exception) -> None:
        """Any interaction whose handler raised: a UserError's sentence or SORRY, ephemeral."""
        if isinstance(error, UserError):
            text = str(error)
        else:
            log.error("interaction failed", exc_info=error)
            text = SORRY
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await send_followup(interaction, Reply(text, ephemeral=True))
            else:
                await interaction.response.send_message(text, ephemeral=True)

    # Buttons and modals (bot/discord_ui.py answers the interaction, then calls these) ----------

    async def post_tile(
        self, interaction: discord.Interaction, mosaic_message_id: int, coordinate: str | None
    ) -> None:
        """A tile of the mosaic that message shows (at random when coordinate is None), posted
        as the deferred interaction's follow-up with an "Ask about this car" button."""
        try:
            args = (PLATFORM, str(interaction.channel_id), str(mosaic_message_id))
            if coordinate is None:
                reply = await self.commands.random_tile_for_message(*args, _limit(interaction))
            else:
                reply = await self.commands.tile_for_message(*args, coordinate,
                                                             _limit(interaction))
            if reply is None:
                reply = Reply("That mosaic is no longer available here.", ephemeral=True)
            await send_followup(interaction, reply, view=_tile_view(reply, self.settings))
        except Exception as error:
            await self.interaction_failed(interaction, error)

    async def ask_about_tile(
        self, interaction: discord.Interaction, mosaic_id: int, label: str, question: str
    ) -> None:
        try:
            await self._queue_for_interaction(interaction, self.commands.ask_about_tile(
                PLATFORM, str(interaction.user.id), _reply_to(interaction), mosaic_id, label,
                question,
            ))
        except Exception as error:
            await self.interaction_failed(interaction, error)

    async def cancel_question(self, interaction: discord.Interaction, job_id: int) -> None:
        """The Cancel button under a waiting question's status (the interaction is deferred)."""
        try:
            reply = await self.commands.cancel_question(PLATFORM, str(interaction.user.id), job_id)
            if reply.ephemeral:
                await interaction.followup.send(reply.text, ephemeral=True)
                return
            # No worker will ever take the job, so no update will come: stop following it.
            self.updates.forget(job_id)
            await interaction.edit_original_response(content=reply.text, view=None)
        except Exception as error:
            await self.interaction_failed(interaction, error)

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
                await self.reply_to_message(message, reply,
                                            view=_tile_view(reply, self.settings))
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

    async def reply_to_message(
        self, message: discord.Message, reply: Reply, view: discord.ui.View | None = None
    ) -> discord.Message:
        """Reply to a message; an ephemeral reply (an error) deletes itself after a while, the
        nearest a plain message comes to the private errors of slash commands."""
        if reply.ephemeral:
            return await message.reply(
                _clip(reply.text), mention_author=False,
                delete_after=self.settings.discord_error_delete_after_s,
            )
        extra = {"view": view} if view is not None else {}
        return await message.reply(_clip(reply.text), files=_files(reply), mention_author=False,
                                   **extra)

    def _photo_and_question(self, message: discord.Message) -> tuple[discord.Attachment, str]:
        """What a message asks: its photo and its text without the bot's mention, or the default
        question when it has no text. Raises BadImage when it has no photo."""
        photo = _first_image(message.attachments)
        if photo is None:
            raise BadImage(NOT_AN_IMAGE if message.attachments else NO_PHOTO_HERE)
        return photo, _question_text(message.content, self.user) or DEFAULT_QUESTION

    async def _ask_in_reply(
        self, message: discord.Message, follow_up_of: int | None = None
    ) -> None:
        """Queue the message's question, about its photo (a follow-up may have none: it asks
        about its conversation's photo), and answer it in reply."""
        image = None
        if follow_up_of is None or message.attachments:
            try:
                photo, question = self._photo_and_question(message)
                image = await self.download(photo)
            except UserError as error:
                await self.reply_to_message(message, error_reply(error))
                return
        if follow_up_of is not None:
            question = _question_text(message.content, self.user)
        reply_to = {"channel_id": str(message.channel.id), "message_id": str(message.id),
                    "user_id": str(message.author.id)}

        async def show(text: str, job_id: int) -> "MessageStatus":
            status = MessageStatus(self, message, job_id)
            await status.show(text)
            return status

        reply = await self._queue(
            self.commands.ask(PLATFORM, str(message.author.id), reply_to, image, question,
                              follow_up_of=follow_up_of),
            show,
        )
        if reply.job_id is None:
            await self.reply_to_message(message, reply)

    async def on_error(self, event_method: str, /, *args, **kwargs) -> None:
        """An event handler failed unexpectedly: log it, and tell the message's author."""
        log.exception("%s failed", event_method)
        message = args[0] if args else None
        if event_method == "on_message" and isinstance(message, discord.Message):
            with contextlib.suppress(discord.HTTPException):
                await self.reply_to_message(message, Reply(SORRY, ephemeral=True))

    # Answers ---------------------------------------------------------------------------------

    async def answer_message(self, job_id: int, text: str, mention: str = "") -> dict:
        """The send() arguments of a final update: an answer as an embed with its sources, any
        other outcome (failed, timed out, cancelled) as its sentence."""
        job = await asyncio.to_thread(self.commands.queue.get, job_id)
        if job is None or job.status != "done":
            return {"content": _clip(mention + text)}
        embed = answer_embed(job.question, job.answer or text, list(job.sources or []))
        return {"content": mention.strip(), "embed": embed} if mention else {"embed": embed}

    async def _answer_without_status(self, job: Job, text: str) -> PostedAnswer | None:
        """Post an answer whose status message this process never saw (e.g. after a restart)."""
        channel_id = (job.reply_to or {}).get("channel_id")
        if not channel_id:
            return None
        user = (job.reply_to or {}).get("user_id")
        message = await self.answer_message(job.id, text, f"<@{user}> " if user else "")
        posted = await self.get_partial_messageable(int(channel_id)).send(**message)
        return _posted(channel_id, posted)

    # Attachments -----------------------------------------------------------------------------

    async def download(self, attachment: discord.Attachment) -> bytes:
        """An attachment's bytes, read with a byte cap (whatever size it announced) and refused
        unless they start like an image (whatever content type it claimed)."""
        max_bytes = self.settings.max_upload_bytes
        check_attachment(attachment.content_type, attachment.size, max_bytes)
        if self._downloads is None:
            self._downloads = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        data = bytearray()
        try:
            async with self._downloads.get(attachment.url) as response:
                if response.status != 200:
                    raise BadImage(DOWNLOAD_FAILED)
                if (response.content_length or 0) > max_bytes:
                    raise over_limit(max_bytes)
                sniffed = False
                async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                    data += chunk
                    if len(data) > max_bytes:
                        raise over_limit(max_bytes)
                    if not sniffed and len(data) >= SNIFF_BYTES:
                        _check_sniffed(data)
                        sniffed = True
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BadImage(DOWNLOAD_FAILED) from error
        _check_sniffed(data)
        return bytes(data)


def _check_sniffed(data: bytearray) -> None:
    if sniffed_image_type(bytes(data[:SNIFF_BYTES])) is None:
        raise BadImage(NOT_AN_IMAGE)


class ShardedTalkMosaicBot(TalkMosaicBot, discord.AutoShardedClient):
    """The same bot over several gateway shards (Discord requires them from 2,500 servers)."""


def discord_bot(settings: Settings, commands: Commands, updates: JobUpdates) -> TalkMosaicBot:
    """The bot the settings ask for: sharded when DISCORD_SHARDED or DISCORD_SHARD_COUNT says
    so (no count: Discord's recommended one)."""
    options = {"guild_id": settings.discord_guild_id,
               "message_content": settings.discord_message_content}
    if settings.discord_sharded or settings.discord_shard_count:
        return ShardedTalkMosaicBot(commands, updates, shard_count=settings.discord_shard_count,
                                    **options)
    return TalkMosaicBot(commands, updates, **options)


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
        """The deferred response shows the build's progress, then becomes the mosaic."""
        await interaction.response.defer(thinking=True)
        try:
            data = await self.bot.download(target)
        except UserError as error:
            await send_followup(interaction, error_reply(error))
            return

        async def progress(text: str) -> None:
            await interaction.edit_original_response(content=_clip(text))

        reply = await self.bot.commands.build(
            _scope(interaction), _user(interaction), data, name, columns, _limit(interaction),
            progress=progress,
        )
        if reply.ephemeral or reply.mosaic_id is None:
            await send_followup(interaction, reply)
            return
        message = await interaction.edit_original_response(
            content=_clip(reply.text), attachments=_files(reply), view=self._view(reply)
        )
        await self._remember(interaction, reply, message)

    @app_commands.command(description="Show a mosaic; reply to it with a tile such as C7.")
    @app_commands.describe(name="The mosaic's name")
    async def show(self, interaction: discord.Interaction, name: str) -> None:
        await interaction.response.defer(thinking=True)
        reply = await self.bot.commands.show(
            _scope(interaction), _user(interaction), name, _limit(interaction)
        )
        message = await send_followup(interaction, reply, view=self._view(reply))
        await self._remember(interaction, reply, message)

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
        await send_followup(interaction, reply, view=_tile_view(reply, self.bot.settings))

    @show.autocomplete("name")
    @tile.autocomplete("name")
    async def _mosaic_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = await self.bot.commands.mosaic_names(_scope(interaction), current)
        return [app_commands.Choice(name=name, value=name) for name in names]

    def _view(self, reply: Reply) -> discord.ui.View | None:
        if reply.mosaic_id is None:
            return None
        return mosaic_view(reply.mosaic_id, self.bot.commands.gallery_url(reply.mosaic_id))

    async def _remember(
        self, interaction: discord.Interaction, reply: Reply, message: discord.Message | None
    ) -> None:
        if reply.mosaic_id is not None and message is not None:
            await self.bot.commands.remember(
                PLATFORM, str(interaction.channel_id), str(message.id), reply.mosaic_id
            )


class _QuestionStatus:
    """Where a queued question's status shows, with a Cancel button while no worker has it."""

    def __init__(self, bot: TalkMosaicBot, job_id: int):
        self.bot = bot
        self.job_id = job_id
        self._cancellable = False

    async def _edit(self, **fields) -> None:
        raise NotImplementedError

    async def update(self, text: str) -> None:
        await self._edit(content=_clip(text), **await self._view_change())

    async def _view_change(self) -> dict:
        """{"view": None} once the job has left the queue (it can no longer be cancelled)."""
        if not self._cancellable:
            return {}
        position = await asyncio.to_thread(self.bot.commands.queue.position, self.job_id)
        if position is not None:
            return {}
        self._cancellable = False
        return {"view": None}

    async def _drop_cancel(self) -> None:
        if self._cancellable:
            self._cancellable = False
            with contextlib.suppress(discord.HTTPException):
                await self._edit(view=None)


class InteractionStatus(_QuestionStatus):
    """A job's status shown as the deferred response of an interaction; the answer follows up.

    Interaction tokens last 15 minutes: after that the answer goes to the channel instead."""

    def __init__(self, bot: TalkMosaicBot, interaction: discord.Interaction, job_id: int):
        super().__init__(bot, job_id)
        self.interaction = interaction

    async def show(self, text: str) -> None:
        await self.interaction.edit_original_response(content=_clip(text),
                                                      view=waiting_view(self.job_id))
        self._cancellable = True

    async def _edit(self, **fields) -> None:
        if not self.interaction.is_expired():
            await self.interaction.edit_original_response(**fields)

    async def finish(self, text: str) -> PostedAnswer:
        if not self.interaction.is_expired():
            await self._drop_cancel()
            message = await self.bot.answer_message(self.job_id, text)
            posted = await self.interaction.followup.send(**message, wait=True)
        else:
            message = await self.bot.answer_message(self.job_id, text,
                                                    f"<@{self.interaction.user.id}> ")
            posted = await self.bot.get_partial_messageable(self.interaction.channel_id).send(
                **message
            )
        return _posted(self.interaction.channel_id, posted)


class MessageStatus(_QuestionStatus):
    """A job's status shown as the bot's reply to a message; the answer replies to the asker."""

    def __init__(self, bot: TalkMosaicBot, asked: discord.Message, job_id: int):
        super().__init__(bot, job_id)
        self.asked = asked
        self.status: discord.Message | None = None

    async def show(self, text: str) -> None:
        self.status = await self.asked.reply(_clip(text), mention_author=False,
                                             view=waiting_view(self.job_id))
        self._cancellable = True

    async def _edit(self, **fields) -> None:
        await self.status.edit(**fields)

    async def finish(self, text: str) -> PostedAnswer:
        await self._drop_cancel()
        message = await self.bot.answer_message(self.job_id, text)
        return _posted(self.asked.channel.id, await self.asked.reply(**message))


def _posted(channel_id: int | str, message: discord.Message) -> PostedAnswer:
    return PostedAnswer(PLATFORM, str(channel_id), str(message.id))


async def send_followup(
    interaction: discord.Interaction, reply: Reply, view: discord.ui.View | None = None
) -> discord.WebhookMessage | None:
    """Follow a deferred interaction up. The "thinking" message is public, so an ephemeral
    reply deletes it first: otherwise the first follow-up would inherit its visibility."""
    if reply.ephemeral:
        with contextlib.suppress(discord.NotFound):
            await interaction.delete_original_response()
        await interaction.followup.send(_clip(reply.text), ephemeral=True)
        return None
    extra = {"view": view} if view is not None else {}
    return await interaction.followup.send(_clip(reply.text), files=_files(reply), wait=True,
                                           **extra)


def message_filesize_limit(message: discord.Message) -> int:
    guild = message.guild
    return guild.filesize_limit if guild else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES


def _question_text(content: str, me: discord.ClientUser | None) -> str:
    if me is not None:
        content = content.replace(f"<@{me.id}>", " ").replace(f"<@!{me.id}>", " ")
    return " ".join(content.split())


def _reply_to(interaction: discord.Interaction) -> dict:
    return {"channel_id": str(interaction.channel_id), "user_id": str(interaction.user.id)}


def _scope(interaction: discord.Interaction) -> str:
    return scope_of(interaction.guild_id, interaction.user.id)


def _user(interaction: discord.Interaction) -> str:
    return f"{PLATFORM}:{interaction.user.id}"


def _limit(interaction: discord.Interaction) -> int:
    settings = interaction.client.commands.ctx.settings
    return min(interaction.filesize_limit, settings.preview_max_bytes)
