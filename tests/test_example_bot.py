"""The example bot (``examples/bot``) run offline under dpytest (simulated Discord), on both backends (issue 17).

The bot is started the way discord.py starts it (``setup_hook`` in the test's event loop: store opened, migrations
applied, cog loaded, backup task started), then members join and a few thousand messages arrive, most in
concurrent bursts (every handler of a burst runs at once, as a busy guild's gateway delivers them). What the bot
answers and what it stored are checked against a ground truth the test computes from the messages it sent. The
longest event-loop stall seen meanwhile is printed (a bot's heartbeat shares that loop), never asserted. Measured:
50-250 ms on either backend, which is a burst's 200 handlers each taking its turn at once (dpytest delivers a
burst in one go, the gateway one frame at a time); asyncio's debug mode with ``slow_callback_duration = 0.02``
flagged no single callback over 20 ms during the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

discord = pytest.importorskip("discord", reason="discord.py is in the test extra")
dpytest = pytest.importorskip("discord.ext.test", reason="dpytest is in the test extra")

import storage  # noqa: E402
from examples.bot import StorageBot, format_stats  # noqa: E402
from storage import StoreConfig  # noqa: E402
from storage.models import MEMBERS, iso_utc, member_key  # noqa: E402

backend_api = dpytest.backend

#: forget_guild / forget_user / export_user come with the lifecycle half of issue 14
lifecycle = pytest.mark.skipif(not hasattr(storage.stores.JsonStore, "forget_guild"),
                               reason="store.forget_guild / forget_user / export_user (issue 14) not merged yet")


class StallMonitor:
    """A task that sleeps 2 ms at a time and keeps the worst lateness: the longest the loop was held by anything
    but the test's own synchronous work (dpytest builds a burst's messages in one go: :meth:`paused`)."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.worst = 0.0
        self._paused = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start, was_paused = loop.time(), self._paused
            await asyncio.sleep(self.period)
            if not (was_paused or self._paused):
                self.worst = max(self.worst, loop.time() - start - self.period)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def stop(self) -> float:
        self._task.cancel()
        return self.worst


class Truth:
    """What the bot should have stored: computed from the messages the test sent."""

    def __init__(self) -> None:
        self.count: Counter[tuple[int, int]] = Counter()  # (guild, author) -> messages
        self.days: dict[int, Counter[str]] = defaultdict(Counter)
        self.last: dict[tuple[int, int], str] = {}
        self.lengths: Counter[int] = Counter()

    def add(self, message: discord.Message) -> None:
        guild, author = message.guild.id, message.author.id
        when = iso_utc(message.created_at)
        self.count[guild, author] += 1
        self.days[guild][when[:10]] += 1
        self.lengths[guild] += len(message.content)
        if (guild, author) not in self.last or message.created_at > _parse(self.last[guild, author]):
            self.last[guild, author] = when

    def top(self, guild: int, limit: int) -> list[tuple[str, int]]:
        rows = [(str(a), n) for (g, a), n in self.count.items() if g == guild]
        return sorted(rows, key=lambda r: (-r[1], r[0]))[:limit]


def _parse(text: str):
    return storage.models.parse_timestamp(text)


@pytest.fixture
async def bot(store_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StorageBot]:
    monkeypatch.chdir(tmp_path)  # dpytest writes the files a bot sends to ./dpytest_N.dat
    client = StorageBot(store_config)
    await client._async_setup_hook()  # what Client.login does before setup_hook
    await client.setup_hook()
    dpytest.configure(client, guilds=2, text_channels=2, voice_channels=0, members=0)
    try:
        yield client
    finally:
        await dpytest.empty_queue()
        client.ws = None  # dpytest's fake gateway has no socket, which discord.py 2.7's close() would ask about
        cog = client.get_cog("DataCog")
        await client.close()
        assert client.store is None and not cog.backup.is_running()


async def _people(bot: StorageBot, rnd: random.Random):
    """30 members join guild 0, 10 guild 1 (4 of them are in both), plus a moderator in each."""
    config = dpytest.get_config()
    g0, g1 = config.guilds
    chatters0 = [await dpytest.member_join(g0, name=f"user{i}") for i in range(30)]
    chatters1 = [await dpytest.member_join(g1, user=m._user) for m in chatters0[:4]]
    chatters1 += [await dpytest.member_join(g1, name=f"other{i}") for i in range(6)]
    mods = []
    for guild in (g0, g1):
        mod = await dpytest.member_join(guild, name=f"mod_{guild.id}")
        role = backend_api.make_role("mods", guild, permissions=discord.Permissions(manage_guild=True).value)
        await dpytest.add_role(mod, role)
        mods.append(mod)
    await dpytest.run_all_events()
    return (g0, g1), (chatters0, chatters1), mods


async def _chat(truth: Truth, channels, chatters, rnd: random.Random, *, sequential: int, bursts: int,
                burst_size: int, monitor: StallMonitor | None = None) -> int:
    """Messages one at a time (each handled before the next), then bursts handled all at once."""
    sent = 0
    for _ in range(sequential):
        message = await dpytest.message("hello " * rnd.randint(0, 5), channel=rnd.choice(channels),
                                        member=rnd.choice(chatters))
        truth.add(message)
        sent += 1
    for _ in range(bursts):
        with monitor.paused() if monitor else contextlib.nullcontext():
            for _ in range(burst_size):  # dispatched, not yet handled: the handlers run concurrently below
                message = backend_api.make_message("x" * rnd.randint(1, 40), rnd.choice(chatters),
                                                   rnd.choice(channels))
                truth.add(message)
                sent += 1
        await dpytest.run_all_events()
    return sent


async def _reply(content: str, channel, member) -> discord.Message:
    message = await dpytest.message(content, channel=channel, member=member)
    return message


async def test_bot_members_messages_commands_backup(bot: StorageBot, backend: str) -> None:
    rnd = random.Random(1717)
    store = bot.store
    assert store is not None
    assert bot.migrated == ["1.1.0", "1.1.1"]  # applied at startup, in the loop that uses the store
    truth = Truth()
    monitor = StallMonitor()
    started = time.perf_counter()
    (g0, g1), (chatters0, chatters1), (mod0, mod1) = await _people(bot, rnd)
    # every join stored, with the canonical join date and the default preferences
    for guild, members in ((g0, chatters0), (g1, chatters1)):
        for member in members:
            doc = await store.get_member_data(member.id, guild.id)
            # dpytest's members have no joined_at: the bot then records the time it saw the join
            expected = iso_utc(member.joined_at) if member.joined_at else doc["join_date"]
            assert doc["join_date"] == expected and storage.models.is_canonical(expected)
            assert doc["statistics"] == {"message_count": 0, "last_active": None}
            assert doc["preferences"]["notifications"] is True
    assert (await store.get_member_data(mod0.id, g0.id))["roles"] == ["mods"]

    sent = await _chat(truth, g0.text_channels, chatters0, rnd, sequential=100, bursts=9, burst_size=200,
                       monitor=monitor)
    sent += await _chat(truth, g1.text_channels, chatters1, rnd, sequential=50, bursts=1, burst_size=150,
                        monitor=monitor)
    chat_seconds = time.perf_counter() - started

    # !stats: the top authors and the per-day chart (commands are not activity: not counted)
    names = {str(m.id): m.display_name for m in g0.members}
    await dpytest.empty_queue()
    await _reply("!stats", g0.text_channels[0], mod0)
    assert dpytest.get_message().content == format_stats(g0.name, truth.top(g0.id, 5), dict(truth.days[g0.id]),
                                                          names)

    # !rank: members by message count, ties by key
    await dpytest.empty_queue()
    await _reply("!rank", g0.text_channels[0], mod0)
    rows = sorted(((member_key(a, g), n) for (g, a), n in truth.count.items() if g == g0.id),
                  key=lambda r: (-r[1], r[0]))[:10]
    names = {str(m.id): m.display_name for m in g0.members}
    expected = "\n".join(["**Most messages**"] + [f"{i}. {names[k.rpartition('_')[2]]}: {n}"
                                                  for i, (k, n) in enumerate(rows, 1)])
    assert dpytest.get_message().content == expected

    # !prefix: shown, refused without the permission, changed by a moderator, used at once, per guild
    await _reply("!prefix", g0.text_channels[0], chatters0[0])
    assert dpytest.get_message().content == "The prefix is `!`"
    await _reply("!prefix ?", g0.text_channels[0], chatters0[0])
    assert "Manage Server" in dpytest.get_message().content
    await _reply("!prefix ?", g0.text_channels[0], mod0)
    assert dpytest.get_message().content == "The prefix is now `?`"
    assert await store.get("settings", str(g0.id)) == {"prefix": "?"}  # an int key is its decimal text
    truth.add(await _reply("!stats", g0.text_channels[0], mod0))  # "!" is not this guild's prefix now: activity
    assert dpytest.verify().message().nothing()
    await _reply("?prefix", g0.text_channels[0], mod0)
    assert dpytest.get_message().content == "The prefix is `?`"
    await _reply("!prefix", g1.text_channels[0], mod1)
    assert dpytest.get_message().content == "The prefix is `!`"

    # what the store holds: every message once, every counter exact (no lost increment in the bursts)
    stalls = monitor.stop()
    for guild in (g0, g1):
        by_author = await store.message_counts(guild.id, by="author")
        expected = {str(a): n for (g, a), n in truth.count.items() if g == guild.id}
        assert by_author == expected
        for (g, author), n in truth.count.items():
            if g != guild.id:
                continue
            stats = (await store.get_member_data(author, guild.id))["statistics"]
            assert stats["message_count"] == n, (guild.id, author)
            if (g, author) in truth.last:
                assert stats["last_active"] == truth.last[g, author]
        assert await store.refresh_member_statistics(guild.id) == 0  # the bot's counters agree with the records
    assert sum(truth.count.values()) == sent + 1

    # the backup task ran once at start (its first iteration), and a backup verifies
    cog = bot.get_cog("DataCog")
    assert cog.backup.is_running()  # started by cog_load; stopped by the bot's close() before the store closes
    await cog.backup()  # what the next iteration does
    backups = await store.list_backups()
    assert backups and (await store.verify_backup(backups[-1].id)).ok
    print(f"\n[{backend}] example bot: {sent} messages ({sent - 150} in bursts of 150-200) in {chat_seconds:.1f} s; "
          f"longest event-loop stall {stalls * 1000:.1f} ms")


@lifecycle
async def test_bot_data_requests_and_guild_removal(bot: StorageBot, backend: str) -> None:
    rnd = random.Random(4242)
    store = bot.store
    assert store is not None
    truth = Truth()
    (g0, g1), (chatters0, chatters1), (_mod0, mod1) = await _people(bot, rnd)
    await _chat(truth, g0.text_channels, chatters0, rnd, sequential=20, bursts=3, burst_size=150)
    await _chat(truth, g1.text_channels, chatters1, rnd, sequential=20, bursts=1, burst_size=100)

    # !mydata: a JSON file with the member's records in both guilds and every message of theirs
    both = chatters0[0]
    await _reply("!mydata", g0.text_channels[0], both)
    reply = dpytest.get_message()
    assert reply.attachments, reply.content
    exported = json.loads(Path(unquote(urlparse(reply.attachments[0].url).path)).read_text())
    assert sorted(exported["members"]) == sorted([str(g0.id), str(g1.id)])
    assert exported["members"][str(g0.id)]["statistics"]["message_count"] == truth.count[g0.id, both.id]
    assert len(exported["messages"]) == truth.count[g0.id, both.id] + truth.count[g1.id, both.id]

    # !forgetme in guild 1: gone there, kept in guild 0
    await _reply("!forgetme", g1.text_channels[0], both)
    assert dpytest.get_message().content.startswith("Done:")
    await dpytest.run_all_events()
    assert await store.get(MEMBERS, member_key(both.id, g1.id)) is None
    assert str(both.id) not in await store.message_counts(g1.id, by="author")
    assert (await store.get_member_data(both.id, g0.id))["statistics"]["message_count"] == truth.count[g0.id, both.id]

    # the bot leaves guild 1: everything the guild owned is removed, guild 0 untouched
    await _reply("!prefix ?", g1.text_channels[0], mod1)
    backend_api.get_state().parse_guild_delete({"id": str(g1.id)})
    await dpytest.run_all_events()
    assert await store.message_counts(g1.id) == 0
    assert [k async for k, _ in store.items(MEMBERS, prefix=f"{g1.id}_")] == []
    assert await store.get("settings", g1.id) is None
    assert await store.message_counts(g0.id) == sum(n for (g, _), n in truth.count.items() if g == g0.id)
