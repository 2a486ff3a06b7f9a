"""The optional access token (`server.token`): one check for every route that takes it (calls,
the chat API, the LLM tier).

`token_ok(token, authorization, alternative="")`: True where no token is set, or where the
`Authorization: Bearer <token>` header (else `alternative`, e.g. a `?token=` query value where a
route accepts one) carries it; compared in constant time.
"""

from __future__ import annotations

import hmac

__all__ = ["token_ok"]


def token_ok(token: str, authorization: str, alternative: str = "") -> bool:
    if not token:
        return True
    given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else alternative
    return hmac.compare_digest(given.encode(), token.encode())
