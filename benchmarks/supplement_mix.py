"""What the server step sent, per supplement round, pooled over finished runs: how full the supplements
were (size / budget B_k), how many classes a client's supplement covers, and the share of the classes
rarest in the global distribution (the upper half by index: digits' long tail runs 0 -> 9).

    python benchmarks/supplement_mix.py runs/compare_digits/runs/IF=10/FedDPD/seed*
"""
import argparse
import json
from pathlib import Path

import numpy as np


def supplement_mix(run_dirs: list[str]) -> dict[int, dict]:
    per_round: dict[int, dict] = {}
    for d in run_dirs:
        metrics = json.loads((Path(d) / "metrics.json").read_text())
        for rec in metrics["rounds"]:
            sups = (rec.get("server_step") or {}).get("supplements")
            if not sups:
                continue
            row = per_round.setdefault(rec["round"], {"budget": 0, "size": 0, "classes": [], "rare": 0})
            for sup in sups.values():
                classes = np.asarray(sup["classes"])
                row["budget"] += sup["budget"]
                row["size"] += sup["size"]
                row["classes"].append(int((classes > 0).sum()))
                row["rare"] += int(classes[len(classes) // 2:].sum())
    return {r: {"filled": row["size"] / max(row["budget"], 1), "classes_per_client": float(np.mean(row["classes"])),
                "rare_share": row["rare"] / max(row["size"], 1), "runs": len(run_dirs)}
            for r, row in sorted(per_round.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished run folders (each with metrics.json)")
    opts = parser.parse_args()
    print("| after round | filled (size / budget) | classes per client | rare-half share |")
    print("|---|---|---|---|")
    for r, row in supplement_mix(opts.runs).items():
        print(f"| {r} | {row['filled']:.2f} | {row['classes_per_client']:.1f} | {row['rare_share']:.2f} |")


if __name__ == "__main__":
    main()
