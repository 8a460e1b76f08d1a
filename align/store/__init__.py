"""The preference store (DESIGN §3): model versions, prompts, responses, pairs, votes, leases and users in SQL.

    from align.store import connect, add_prompts, make_pairs, add_vote, export_preferences
    with connect("runs/store.db") as store:        # or "postgresql://user:pass@host/db"
        ...
"""

from align.store.db import Store, connect, open_store
from align.store.export import (
    Verdict,
    aggregate,
    export_preferences,
    export_sft,
    export_unpaired,
    to_trl,
    to_dataset,
    write_jsonl,
)
from align.store.leases import has_live_lease, lease_next_pair, release_lease, undo_last_vote
from align.store.migrations import MIGRATIONS, SCHEMA_VERSION
from align.store.pairs import PAIR_RULES, get_pair, make_pairs, set_gold
from align.store.samples import add_prompts, add_responses, existing_sample_keys
from align.store.schema import (
    VOTE_CHOICES,
    VOTE_KINDS,
    Assignment,
    LeaseSlot,
    LoginSession,
    LoginThrottle,
    ModelVersion,
    Pair,
    Prompt,
    Response,
    User,
    Vote,
)
from align.store.users import add_user, verify_user
from align.store.versions import get_model_version, register_model_version
from align.store.votes import add_vote, effective_votes, open_pairs

__all__ = [
    "MIGRATIONS", "PAIR_RULES", "SCHEMA_VERSION", "VOTE_CHOICES", "VOTE_KINDS",
    "Assignment", "LeaseSlot", "LoginSession", "LoginThrottle", "ModelVersion", "Pair", "Prompt", "Response", "Store", "User", "Verdict", "Vote",
    "add_prompts", "add_responses", "add_user", "add_vote", "aggregate", "connect", "effective_votes",
    "existing_sample_keys", "export_preferences", "export_sft", "export_unpaired", "to_trl", "get_model_version",
    "get_pair", "has_live_lease", "lease_next_pair", "make_pairs", "open_pairs", "open_store",
    "register_model_version", "release_lease", "set_gold", "to_dataset", "undo_last_vote", "verify_user",
    "write_jsonl",
]
