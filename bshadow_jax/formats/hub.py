"""Hugging Face Hub ids as checkpoint paths: a local snapshot of the safetensors and JSON files only."""
from __future__ import annotations

import os
import re
from pathlib import Path

from bshadow_jax.errors import UserError

# what a snapshot fetches: never pickle weights, never code
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(path: str) -> bool:
    """True for "org/name" that is not an existing local path."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def snapshot(repo_id: str) -> Path:
    """The local snapshot folder of hub repo `repo_id` (downloaded if need be)."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - offline, not found, gated: all one message for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{repo_id}: not a local file or folder, and downloading it from the Hugging Face Hub failed "
            f"(offline or not found: {type(e).__name__}: {first})"
        ) from None
    return Path(local)
