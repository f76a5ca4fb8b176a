"""The AutoBot remotes: chatsave over an AutoBot backend (docs/autobot.md).

One module a concern (docs/architecture.md, "Packages and layers"):

- ``shapes``: AutoBot's data as chatsave reads it: ids, message shapes, times, the chat as
  read (``ChatState``), and the errors the remotes raise. No I/O.
- ``rules``: the model of what AutoBot's merge and loader do to a chat. Pure.
- ``planner``: what a save writes and what its answer says, from the chat as read and
  the batch. Pure.
- ``base``: ``AutobotBase``, the Remote interface over AutoBot: reading, saving and
  deleting under a per-chat lock, capabilities; it calls the planner.
- ``http``: ``AutobotRemote`` (``autobot+http(s)://host``), AutoBot's own HTTP API.
- ``directory``: ``AutobotDirRemote`` (``autobot-dir:PATH``), AutoBot's chat files.
- ``doctor``: ``chatsave doctor``'s examination and ``--repair``.

Import the module that holds a name; this package exports nothing of its own.
"""
