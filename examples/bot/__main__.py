"""``DISCORD_TOKEN=... python -m examples.bot``: run the example bot (the store from the environment)."""

from __future__ import annotations

import logging
import os
import sys

from .bot import StorageBot


def main() -> int:
    token = os.environ.get("DISCORD_TOKEN")
    if not token:
        print("set DISCORD_TOKEN to the bot's token (Discord developer portal, Bot tab)", file=sys.stderr)
        return 2
    # bot.run() makes the event loop; setup_hook opens the store inside it, close() closes it
    StorageBot().run(token, log_level=logging.INFO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
