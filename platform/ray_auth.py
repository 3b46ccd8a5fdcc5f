"""Ray's token authentication, seen from a client: where the token is, and turning it on.

A cluster started with `RAY_AUTH_MODE=token` refuses every client without its token. Ray looks
for the token in `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else
`~/.ray/auth_token`, but a client sends it only when `RAY_AUTH_MODE=token` is set on the client
as well. Our drivers and `submit` send it whenever they find one.
"""

from __future__ import annotations

import os
from pathlib import Path

from maxdeeplab.platform.errors import ClusterError

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


def auth_token() -> tuple[str | None, str]:
    """(token, where it came from), looked up where and in the order Ray looks it up.

    Raises:
        ClusterError: RAY_AUTH_TOKEN_PATH names a file that cannot be read or is empty.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if named:
        try:
            token = Path(named).expanduser().read_text().strip()
        except OSError as exc:
            raise ClusterError(
                f"RAY_AUTH_TOKEN_PATH={named}: cannot read the token ({exc.strerror})"
            ) from None
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={named}: the file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={named}"
    default = DEFAULT_TOKEN_FILE.expanduser()
    try:
        token = default.read_text().strip()
    except OSError:
        return None, ""
    return (token, str(DEFAULT_TOKEN_FILE)) if token else (None, "")


def use_token_if_found() -> None:
    """Turn Ray's token mode on for this process (and the Ray processes it starts) when a token
    is there to send; `RAY_AUTH_MODE` set by the user is left as it is.

    Call it before Ray is imported: Ray reads the mode once, when its core starts.
    """
    if "RAY_AUTH_MODE" not in os.environ and auth_token()[0]:
        os.environ["RAY_AUTH_MODE"] = "token"
