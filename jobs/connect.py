"""A ``JobSubmissionClient`` for a cluster address, with Ray's token authentication.

Ray 2.60 clusters started with ``RAY_AUTH_MODE=token`` answer the job API only with
``Authorization: Bearer <token>``. Ray's own client sends it only when the *client*
process also runs in token mode, so we read the token ourselves, from the places Ray
documents, in Ray's order: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
then ``~/.ray/auth_token``; and we pass it as a header. ``RAY_AUTH_MODE=disabled`` turns
that off. The token itself never appears in a message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.credentials import url_credential_problem

DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
_HOW = ("set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at the token file, or put it in ~/.ray/auth_token "
        "(`ray get-auth-token` on the head node prints it)")


class ClusterError(RuntimeError):
    """Cannot talk to the cluster. The message is one sentence."""


@dataclass(frozen=True)
class Token:
    value: str = ""
    source: str = ""  # where it came from, for messages ("RAY_AUTH_TOKEN", a path); never the value

    def __repr__(self) -> str:  # never show the secret, even in a traceback
        return f"Token(source={self.source!r})"


def find_token(environ: Mapping[str, str] | None = None) -> Token | None:
    """The token from Ray's documented sources, or None. Raises ClusterError on an unreadable file."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH names {path}, which cannot be read "
                               f"({exc.strerror or type(exc).__name__}).") from None
        if not value:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH names {path}, which is empty.")
        return Token(value, str(path))
    home = environ.get("HOME")
    path = (Path(home) / ".ray" / "auth_token") if home else Path(DEFAULT_TOKEN_PATH).expanduser()
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return Token(value, str(path)) if value else None


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    # the order of Ray's own `ray job` commands
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("No Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS.")
    problem = url_credential_problem(address)
    if problem:  # it would be repeated by every error message about the cluster
        raise ClusterError(f"The Ray cluster address is {problem}; give the address alone and the token through "
                           "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")
    return address.rstrip("/")


@dataclass
class Cluster:
    """A connected ``JobSubmissionClient`` plus what is needed to explain its failures."""

    client: Any
    address: str
    token: Token | None

    def call(self, what: str, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        """Run one client call; Ray's exceptions become one-sentence ClusterErrors."""
        from ray.exceptions import AuthenticationError

        try:
            return getattr(self.client, fn_name)(*args, **kwargs)
        except AuthenticationError as exc:
            raise auth_error(self.address, self.token, exc) from None
        except ConnectionError as exc:
            raise ClusterError(f"Lost the Ray job server at {self.address} while trying to {what}: "
                               f"{_first_line(exc)}") from None
        except RuntimeError as exc:
            raise ClusterError(f"Cannot {what}: {_first_line(exc)}") from None


def connect(address: str | None = None, environ: Mapping[str, str] | None = None) -> Cluster:
    """Connect to the job server; every failure is a one-sentence ClusterError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address, environ)
    token = find_token(environ)
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        client = JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise auth_error(address, token, exc) from None
    except ConnectionError as exc:
        raise ClusterError(f"Cannot reach the Ray job server at {address}: is the cluster up and its dashboard "
                           f"(port 8265 by default) reachable? ({_first_line(exc)})") from None
    except (ValueError, RuntimeError) as exc:
        raise ClusterError(f"Cannot use the Ray address {address!r}: {_first_line(exc)}") from None
    return Cluster(client, address, token)


def auth_error(address: str, token: Token | None, exc: BaseException | None = None) -> ClusterError:
    """One sentence: what is missing (or wrong), and where Ray looks for it."""
    text = str(exc or "")
    if token is None:
        return ClusterError(f"The Ray cluster at {address} requires an authentication token and none was found: "
                            f"{_HOW}.")
    if "Forbidden" in text or "invalid" in text.lower():
        return ClusterError(f"The Ray cluster at {address} rejected the authentication token from {token.source}: "
                            "it is not this cluster's token.")
    return ClusterError(f"The Ray cluster at {address} refused the request for authentication "
                        f"(token from {token.source}): {_first_line(exc)}")


def _first_line(exc: BaseException | None) -> str:
    text = " ".join(str(exc or "").split())
    return text if len(text) < 300 else text[:300] + "..."
