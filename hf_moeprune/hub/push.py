"""Upload a reduced checkpoint folder, with its generated card, to the Hugging Face Hub.

huggingface_hub does the work: `validate_repo_id`, `ModelCard.validate`, `create_repo`, and `upload_folder`, which
sends every file in one commit (large files through LFS or Xet) and retries transient failures of the transfers
with its own backoff. The folder is only read, never written: a failed push (no token, server down, rejected card)
leaves the local checkpoint exactly as it was, and the error says what to do. Running the same push again after
a failure is safe: files the Hub already holds are not sent twice.

Example:
    >>> from hf_moeprune.hub import push_checkpoint
    >>> push_checkpoint("out/mixtral-4e", "me/mixtral-4e", private=True)
    'https://huggingface.co/me/mixtral-4e/commit/...'
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .card import build_model_card, is_generated_card, read_moeprune_entry, resolve_base_license

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Never uploaded: caches and VCS folders that may sit in an output folder.
SKIPPED_NAMES = frozenset({".git", ".cache", "__pycache__", ".DS_Store"})


class HubPushError(RuntimeError):
    """A push to the Hub failed. The local checkpoint was not modified."""


def _step(call: Callable[[], T], *, what: str) -> T:
    """Run one Hub call; its failure becomes a `HubPushError` that says what failed and what to do."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return call()
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise HubPushError(
                f"Could not {what}: the Hub at {constants.ENDPOINT} rejected the token (HTTP 401). Pass a valid "
                "write token with token=..., set HF_TOKEN, or run `hf auth login`. Nothing was changed locally."
            ) from error
        if status == 403:
            raise HubPushError(
                f"Could not {what}: the token has no write access there (HTTP 403). Use a token with write "
                "permission on that namespace. Nothing was changed locally."
            ) from error
        message = " ".join(str(error).split())
        raise HubPushError(f"Could not {what}: {message}. Nothing was changed locally; run the push again.") from error
    except (httpx2.TransportError, ConnectionError, TimeoutError) as error:
        raise HubPushError(
            f"Could not {what}: the Hub at {constants.ENDPOINT} is unreachable ({type(error).__name__}: {error}). "
            "Nothing was changed locally; check your connection and HF_ENDPOINT, then run the push again."
        ) from error


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


def _validate_card(card_text: str) -> None:
    """`ModelCard.validate`, with the Hub's refusal as a ValueError; a Hub mirror without the endpoint is skipped."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    try:
        ModelCard(card_text).validate()
    except HfHubHTTPError as error:
        if getattr(error.response, "status_code", None) != 404:
            raise
        logger.info("The Hub has no /api/validate-yaml; the card is not validated.")
    except ValueError as error:
        raise ValueError(f"The Hub rejected the model card metadata: {error}") from error


def _stage(folder: Path, card_text: str, staging: Path) -> None:
    """Mirror `folder` in `staging` as links to its files (copies where links are refused), with the card as
    README.md: `upload_folder` then commits weights and card together without writing into the checkpoint."""
    for source in sorted(folder.rglob("*")):
        relative = source.relative_to(folder)
        if not source.is_file() or relative.as_posix() == "README.md" or SKIPPED_NAMES & set(relative.parts):
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(source.resolve())
        except OSError:  # e.g. Windows without symlink rights
            shutil.copy2(source, target)
    (staging / "README.md").write_text(card_text, encoding="utf-8")


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
) -> CommitInfo:
    """Upload a checkpoint folder saved by hf_moeprune to a Hub repository, with a freshly generated model card.

    The card is generated from the checkpoint (base model license read from its Hub card when needed) unless the
    folder holds a hand-written `README.md` (one without the hf_moeprune marker), which is uploaded as is.
    The card is validated by the Hub first, the repository is created if needed (`private` applies only then),
    then `upload_folder` commits every file in one commit. The Hub is the one `HF_ENDPOINT` names.

    Args:
        checkpoint_dir (`str` or `os.PathLike`): folder written by `save_pretrained`. Only read.
        repo_id (`str`): `namespace/name` (or `name`, in the token owner's namespace).
        private (`bool`, *optional*): visibility of a newly created repository.
        token (`str`, *optional*): write token; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        revision (`str`, *optional*): branch to commit to, created from `main` if missing.
        commit_message / commit_description (`str`, *optional*): the commit's summary and body.
        create_pr (`bool`, defaults to `False`): open a pull request against `main` instead of committing.
        tags (`list[str]`, *optional*): extra card tags.

    Returns:
        `huggingface_hub.CommitInfo` (a `str`, the commit URL), with `.oid`, `.pr_url`, `.repo_url`.

    Raises:
        `ValueError`: bad repo id, no token, not an hf_moeprune checkpoint, or card metadata rejected by the Hub.
        `HubPushError` (a `RuntimeError`): Hub unreachable, token rejected, no write access, upload failed, ...
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .. import __version__

    folder = Path(checkpoint_dir)
    _, entry = read_moeprune_entry(folder)  # fails early on a folder that is not ours
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a Hub repository id: {error}") from None
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"A pull request is opened against main; drop revision={revision!r} or create_pr=True.")
    resolved_token = _resolve_token(token)
    api = HfApi(token=resolved_token, library_name="hf_moeprune", library_version=__version__)

    readme = folder / "README.md"
    if readme.is_file() and not is_generated_card(readme.read_text(encoding="utf-8")):
        card_text = readme.read_text(encoding="utf-8")
    else:
        base_model = entry.get("base_model")
        license_ = entry.get("license") or resolve_base_license(base_model, fetch_remote=True, token=resolved_token)
        card_text = str(build_model_card(folder, model_name=repo_id, tags=tags, license=license_))
    _step(lambda: _validate_card(card_text), what="validate the model card")
    repo_id = _step(lambda: api.create_repo(repo_id, private=private, exist_ok=True),
                    what=f"create the repository {repo_id}").repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/"):
        _step(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
              what=f"create the branch {revision} of {repo_id}")

    merged = any(len(g) > 1 for info in (entry.get("layers") or {}).values() for g in info.get("groups") or [])
    message = commit_message or f"Upload {'merged' if merged else 'pruned'} MoE model with hf_moeprune {__version__}"
    with tempfile.TemporaryDirectory(prefix="hf_moeprune-push-") as staging:
        _stage(folder, card_text, Path(staging))
        info = _step(
            lambda: api.upload_folder(
                repo_id=repo_id, folder_path=staging, commit_message=message, commit_description=commit_description,
                revision=revision, create_pr=create_pr,
            ),
            what=f"upload {folder} to {repo_id}",
        )
    logger.info("Pushed %s to %s (%s).", folder, repo_id, info.pr_url or info.commit_url)
    return info
