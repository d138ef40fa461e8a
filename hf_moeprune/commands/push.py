"""`hf-moeprune push OUT_DIR REPO_ID`: upload a saved checkpoint with its generated model card."""

from __future__ import annotations

import argparse
import sys

NAME = "push"
HELP = "Upload a pruned or merged checkpoint folder (weights, config, generated model card) to the Hugging Face Hub."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint_dir", metavar="OUT_DIR", help="Folder written by save_pretrained (or `prune`/`merge`)."
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="Target repository, e.g. me/mixtral-4e.")
    parser.add_argument(
        "--private", action="store_true", default=None, help="Create the repository as private."
    )
    parser.add_argument(
        "--token", default=None, help="Write token (default: HF_TOKEN or the `hf auth login` token)."
    )
    parser.add_argument("--revision", default=None, help="Branch to push to (created from main if missing); not with --create-pr.")
    parser.add_argument("--commit-message", default=None, help="Commit summary.")
    parser.add_argument("--commit-description", default=None, help="Commit description.")
    parser.add_argument(
        "--create-pr", action="store_true", help="Open a pull request against main instead of committing directly."
    )
    parser.add_argument(
        "--tag", dest="tags", action="append", default=None, help="Extra model card tag (repeatable)."
    )
    parser.add_argument("--no-progress", action="store_true", help="No upload progress bars.")


def run(args: argparse.Namespace) -> int:
    from hf_moeprune.hub import HubPushError, push_checkpoint

    if args.no_progress:
        from hf_moeprune.progress import disable_progress_bars

        disable_progress_bars()
    try:
        info = push_checkpoint(
            args.checkpoint_dir,
            args.repo_id,
            private=args.private,
            token=args.token,
            revision=args.revision,
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            create_pr=args.create_pr,
            tags=args.tags,
        )
    except (ValueError, FileNotFoundError, HubPushError) as error:
        print(f"hf-moeprune push: error: {error}", file=sys.stderr)
        return 1
    print(info.pr_url or info.commit_url)
    return 0
