"""The proxies' kept answers to reads (proxy/cache.py), on a real folder: a list
polled again unchanged is not written again, and its age counts from the last read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gpuwarden.proxy.cache import ReadCache

TAGS = b'{"models": [{"name": "standin:7b"}]}'
HEADERS = {"Content-Type": "application/json", "Date": "Mon, 07 Dec 2026 04:00:00 GMT"}


def _files(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.iterdir())}


def test_an_answer_seen_again_unchanged_is_not_written_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = ReadCache(tmp_path)
        assert not cache.unchanged("tags", 200, HEADERS, TAGS)  # never kept
        await cache.put("tags", 200, HEADERS, TAGS)
        written = _files(tmp_path)
        assert sorted(written) == ["tags.body", "tags.json"]
        first = await cache.get("tags")
        assert first is not None and first.body == TAGS

        time.sleep(0.05)
        # Only the Date differs, which is not kept: the same answer.
        assert cache.unchanged("tags", 200, {**HEADERS, "Date": "later"}, TAGS)
        assert _files(tmp_path) == written
        again = await cache.get("tags")
        assert again is not None and again.stored_at > first.stored_at + 0.04

        # A new model pulled, another status, another type: each must be written.
        assert not cache.unchanged("tags", 200, HEADERS, TAGS.replace(b"7b", b"13b"))
        assert not cache.unchanged("tags", 203, HEADERS, TAGS)
        assert not cache.unchanged("tags", 200, {"Content-Type": "text/plain"}, TAGS)
        assert not cache.unchanged("other", 200, HEADERS, TAGS)

    asyncio.run(scenario())


def test_an_unchanged_answer_is_written_again_once_its_copy_is_old(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = ReadCache(tmp_path, rewrite_after_s=0.2)
        await cache.put("tags", 200, HEADERS, TAGS)
        assert cache.unchanged("tags", 200, HEADERS, TAGS)
        time.sleep(0.25)
        assert not cache.unchanged("tags", 200, HEADERS, TAGS)
        await cache.put("tags", 200, HEADERS, TAGS)
        # A restart knows only what is on disk: the last write's time.
        restarted = ReadCache(tmp_path)
        await asyncio.to_thread(restarted.load)
        answer = await restarted.get("tags")
        assert answer is not None and time.time() - answer.stored_at < 0.2
        assert not restarted.unchanged("tags", 200, HEADERS, TAGS)  # not seen this run

    asyncio.run(scenario())


def test_an_answer_dropped_for_room_is_not_taken_as_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = ReadCache(tmp_path, total_limit=2 * len(TAGS))
        for key in ("a", "b", "c"):
            await cache.put(key, 200, HEADERS, TAGS)
            time.sleep(0.01)
        assert await cache.get("a") is None
        assert not cache.unchanged("a", 200, HEADERS, TAGS)
        assert cache.unchanged("c", 200, HEADERS, TAGS)

    asyncio.run(scenario())


def test_a_large_answer_is_not_hashed_on_the_event_loop_but_written_again(
        tmp_path: Path) -> None:
    """An image of a few MiB would take milliseconds to hash on the proxies' loop: it is
    written again in a thread instead, as every answer was before."""
    image = b"\x89PNG" + b"x" * (300 << 10)

    async def scenario() -> None:
        cache = ReadCache(tmp_path)
        await cache.put("view", 200, {"Content-Type": "image/png"}, image)
        assert not cache.unchanged("view", 200, {"Content-Type": "image/png"}, image)
        kept = await cache.get("view")
        assert kept is not None and kept.body == image

    asyncio.run(scenario())
