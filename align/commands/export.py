"""`align export --db URL --out FILE [--kind preferences|sft|unpaired] [filters]`: labeled pairs for training."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from align import store as st
from align.commands.parser import DEFAULT_DB, ArgumentParser, comma_list
from align.data import write_jsonl
from align.errors import AlignError
from align.store.rankings import export_rankings

KINDS = {"preferences": st.export_preferences, "sft": st.export_sft, "unpaired": st.export_unpaired}


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="align export", description="Export labeled pairs for training.")
    parser.add_argument("--db", default=DEFAULT_DB)
    parser.add_argument("--out", required=True, help="Output JSONL (loads with datasets.load_dataset('json', ...)).")
    parser.add_argument("--kind", choices=list(KINDS), default="preferences",
                        help="preferences: prompt/chosen/rejected + provenance; sft: preferred responses; unpaired: KTO rows.")
    parser.add_argument("--model_versions", type=comma_list, default=None,
                        help="Comma-separated version names: pairs sampled from these.")
    parser.add_argument("--since", type=datetime.fromisoformat, default=None, help="Votes at or after (ISO time).")
    parser.add_argument("--until", type=datetime.fromisoformat, default=None, help="Votes before (ISO time).")
    parser.add_argument("--annotators", type=comma_list, default=None, help="Comma-separated annotator names.")
    parser.add_argument("--source", choices=["human", "simulated"], default=None, help="Only human or only simulated votes.")
    parser.add_argument("--min_agreement", type=float, default=0.0, help="Keep pairs whose majority share is at least this.")
    parser.add_argument("--format", choices=["native", "trl"], default="native",
                        help="preferences only. native: every pair with its label and provenance (align dpo/reward); "
                        "trl: decided pairs only as plain prompt/chosen/rejected, for TRL's own trainers (ties and "
                        "both-bad pairs left out and counted).")
    parser.add_argument("--rankings", action="store_true",
                        help="preferences, native: also the K-way rankings, each expanded into its K(K-1)/2 pairs with "
                        "weight 2/K (align/ranking.py); pairwise rows then carry weight 1")
    parser.add_argument("--incomplete", action="store_true",
                        help="also pairs that have fewer votes than they require (default: complete pairs only)")
    args = parser.parse_args(argv)
    if args.format == "trl" and args.kind != "preferences":
        raise AlignError("--format trl applies to --kind preferences (sft and unpaired rows are TRL's formats already)")
    if args.rankings and (args.kind != "preferences" or args.format != "native"):
        raise AlignError("--rankings applies to --kind preferences in the native format (rows carry their weight)")
    with st.connect(args.db) as store:
        rows = KINDS[args.kind](store, model_versions=args.model_versions, since=args.since, until=args.until,
                                annotators=args.annotators, source=args.source, min_agreement=args.min_agreement,
                                complete_only=not args.incomplete)
        if args.rankings:
            rows = [{**row, "weight": 1.0} for row in rows] + export_rankings(store, source=args.source)
    if not rows:
        raise AlignError("nothing to export: no pair has votes matching these filters"
                         + ("" if args.incomplete else " and all the votes it requires (--incomplete: every pair)"))
    if args.format == "trl":
        rows, left_out = st.to_trl(rows)
        if not rows:
            raise AlignError(f"nothing to export: every matching pair is a tie or both-bad ({dict(left_out)})")
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} decided pairs to {args.out} in TRL's format; left out "
              f"{left_out['tie']} tie(s) and {left_out['both_bad']} both-bad pair(s)")
        return
    write_jsonl(rows, args.out)
    labels = Counter(row.get("label", "-") for row in rows)
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(labels.items(), key=lambda kv: str(kv[0])))
    print(f"wrote {len(rows)} {args.kind} rows to {args.out} ({shown})")
