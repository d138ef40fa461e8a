"""Upload a reduced checkpoint folder, with its generated card, to the Hugging Face Hub.

The folder is only read, never written: a failed push (no token, server down, rejected card) leaves the local
checkpoint exactly as it was. Transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with
exponential backoff; everything else fails at once with a message that says what to do.

Example:
    >>> from hf_moeprune.hub import push_checkpoint
    >>> push_checkpoint("out/mixtral-4e", "me/mixtral-4e", private=True)
    'https://huggingface.co/me/mixtral-4e/commit/...'
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .card import (
    _looks_like_hub_repo_id,
    build_model_card,
    fetch_hub_card_license,
    is_generated_card,
    read_moeprune_entry,
    resolve_base_license,
)

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
# Never uploaded: caches and VCS folders that may sit in an output folder.
SKIPPED_NAMES = frozenset({".git", ".cache", "__pycache__", ".DS_Store"})


class HubPushError(RuntimeError):
    """A push to the Hub failed. The local checkpoint was not modified."""


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(error: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return _status_code(error) in TRANSIENT_STATUS_CODES
    return isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError))


def _retry_after_seconds(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _with_retries(
    call: Callable[[], T], *, what: str, endpoint: str, max_retries: int, retry_wait: float, max_wait: float
) -> T:
    """Run `call`, retrying transient failures `max_retries` times with exponential backoff."""
    from huggingface_hub.errors import HfHubHTTPError

    attempt = 0
    while True:
        try:
            return call()
        except Exception as error:
            if not _is_transient(error):
                raise _explain(error, what=what, endpoint=endpoint) from error
            if attempt >= max_retries:
                cause = (
                    f"HTTP {_status_code(error)}"
                    if isinstance(error, HfHubHTTPError)
                    else type(error).__name__
                )
                raise HubPushError(
                    f"Could not {what}: the Hub at {endpoint} is unreachable or failing ({cause}: {error}) after "
                    f"{attempt + 1} attempts. Nothing was changed locally; check your connection and HF_ENDPOINT, "
                    "then run the push again."
                ) from error
            wait = min(max_wait, retry_wait * (2**attempt))
            retry_after = _retry_after_seconds(error)
            if retry_after is not None:
                wait = min(max_wait, max(wait, retry_after))
            logger.warning(
                "Transient error while trying to %s (%s); retry %d/%d in %.2fs.",
                what,
                error,
                attempt + 1,
                max_retries,
                wait,
            )
            time.sleep(wait)
            attempt += 1


def _explain(error: Exception, *, what: str, endpoint: str) -> Exception:
    """Turn a non-transient Hub error into one that says what to do; other exceptions pass through."""
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(error, HfHubHTTPError):
        return error
    status = _status_code(error)
    if status == 401:
        return HubPushError(
            f"Could not {what}: the Hub at {endpoint} rejected the token (HTTP 401). Pass a valid write token with "
            "token=..., set HF_TOKEN, or run `hf auth login`. Nothing was changed locally."
        )
    if status == 403:
        return HubPushError(
            f"Could not {what}: the token has no write access there (HTTP 403). Use a token with write permission "
            "on that namespace. Nothing was changed locally."
        )
    return HubPushError(f"Could not {what}: {error}. Nothing was changed locally.")


def _resolve_token(token: str | bool | None) -> str:
    from huggingface_hub import get_token

    if token is False:
        raise ValueError("Pushing to the Hub needs a token, but token=False was given.")
    resolved = token if isinstance(token, str) and token else get_token()
    if not resolved:
        raise ValueError(
            "No Hugging Face token found, and pushing needs one. Pass token=..., set the HF_TOKEN environment "
            "variable, or run `hf auth login`. Nothing was uploaded; the local checkpoint is unchanged."
        )
    return resolved


def _validate_card(text: str, *, endpoint: str, headers: dict[str, str]) -> None:
    """Ask the Hub to validate the card metadata (as `ModelCard.validate`, but against `endpoint`)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_session, hf_raise_for_status

    response = get_session().post(
        f"{endpoint}/api/validate-yaml",
        json={"repoType": "model", "content": text},
        headers={**headers, "Accept": "text/plain"},
    )
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as error:
        if response.status_code == 400:
            raise ValueError(f"The Hub rejected the model card metadata: {response.text}") from error
        if response.status_code == 404:  # a Hub mirror without the endpoint: nothing to check against
            logger.info("%s has no /api/validate-yaml; the card is not validated.", endpoint)
            return
        raise


def _collect_files(folder: Path) -> list[tuple[str, Path]]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part in SKIPPED_NAMES for part in relative.parts):
            files.append((relative.as_posix(), path))
    return files


def push_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    endpoint: str | None = None,
    max_retries: int = 5,
    retry_wait: float = 1.0,
    max_wait: float = 30.0,
) -> CommitInfo:
    """Upload a checkpoint folder saved by hf_moeprune to a Hub repository, with a freshly generated model card.

    The card is generated from the checkpoint (base model license looked up on the Hub when needed) unless the
    folder holds a hand-written `README.md` (one without the hf_moeprune marker), which is uploaded as is.
    The repository is created if needed (`private` applies only then), the card is validated by the Hub, then
    every file is committed in one commit (large files through LFS).

    Args:
        checkpoint_dir (`str` or `os.PathLike`): folder written by `save_pretrained`. Only read.
        repo_id (`str`): `namespace/name` (or `name`, in the token owner's namespace).
        private (`bool`, *optional*): visibility of a newly created repository.
        token (`str`, *optional*): write token; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        revision (`str`, *optional*): branch to commit to, created from `main` if missing.
        commit_message / commit_description (`str`, *optional*): the commit's summary and body.
        create_pr (`bool`, defaults to `False`): open a pull request instead of committing to the branch.
        tags (`list[str]`, *optional*): extra card tags.
        endpoint (`str`, *optional*): Hub URL; defaults to `HF_ENDPOINT` / https://huggingface.co.
        max_retries (`int`, defaults to 5): retries of each step on transient failures.
        retry_wait / max_wait (`float`): first and longest wait between retries, in seconds (doubling).

    Returns:
        `huggingface_hub.CommitInfo` (a `str`, the commit URL), with `.oid`, `.pr_url`, `.repo_url`.

    Raises:
        `ValueError`: no token, not an hf_moeprune checkpoint, or card metadata rejected by the Hub.
        `HubPushError` (a `RuntimeError`): Hub unreachable after the retries, token rejected, no write access, ...
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from .. import __version__

    folder = Path(checkpoint_dir)
    _, entry = read_moeprune_entry(folder)  # fails early on a folder that is not ours
    resolved_token = _resolve_token(token)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(
        endpoint=endpoint, token=resolved_token, library_name="hf_moeprune", library_version=__version__
    )
    retry = {"endpoint": endpoint, "max_retries": max_retries, "retry_wait": retry_wait, "max_wait": max_wait}

    readme = folder / "README.md"
    if readme.is_file() and not is_generated_card(readme.read_text(encoding="utf-8")):
        card_text = readme.read_text(encoding="utf-8")
    else:
        base_model = entry.get("base_model")
        license_ = entry.get("license") or resolve_base_license(base_model)
        if license_ is None and _looks_like_hub_repo_id(base_model):
            license_ = _with_retries(
                lambda: fetch_hub_card_license(
                    base_model, endpoint=endpoint, token=resolved_token, raise_transient=True
                ),
                what=f"read the license of the base model {base_model}",
                **retry,
            )
        card_text = str(build_model_card(folder, model_name=repo_id, tags=tags, license=license_))
    headers = api._build_hf_headers(token=resolved_token)
    _with_retries(
        lambda: _validate_card(card_text, endpoint=endpoint, headers=headers),
        what="validate the model card",
        **retry,
    )

    repo_url = _with_retries(
        lambda: api.create_repo(repo_id, private=private, exist_ok=True),
        what=f"create the repository {repo_id}",
        **retry,
    )
    repo_id = repo_url.repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/"):
        _with_retries(
            lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
            what=f"create the branch {revision} of {repo_id}",
            **retry,
        )

    files = [(name, path) for name, path in _collect_files(folder) if name != "README.md"]
    kind = (
        "merged"
        if any(len(g) > 1 for info in (entry.get("layers") or {}).values() for g in info.get("groups") or [])
        else "pruned"
    )
    message = commit_message or f"Upload {kind} MoE model with hf_moeprune {__version__}"

    def commit() -> CommitInfo:
        # Operations are rebuilt per attempt: huggingface_hub marks them as uploaded/committed in place.
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files
        ]
        operations.append(
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8"))
        )
        return api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )

    info = _with_retries(commit, what=f"upload {folder} to {repo_id}", **retry)
    logger.info("Pushed %s to %s (%s).", folder, repo_id, info.pr_url or info.commit_url)
    return info
