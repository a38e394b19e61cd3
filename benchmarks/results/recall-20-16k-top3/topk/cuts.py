"""Relative score cuts at 16k simulated from the hybrid@j cells (as recall_placement analyse does).
argv: topk dir (placement.json of place(q,3) without cut + recall.json hybrid@2/@3 without cut),
cut-run recall.json (contextmemory, hybrid@1, and hybrid@2/@3 measured with the working tree's 0.3 cut)."""
import json, sys
from pathlib import Path
topk, cutrun = Path(sys.argv[1]), Path(sys.argv[2])
pl = json.loads((topk / "placement.json").read_text())
res_cut = json.loads(cutrun.read_text())
res_top = json.loads((topk / "recall.json").read_text())
facts = res_cut["facts"]
rows = {}
for c in res_cut["cells"]:
    if c["method"] in ("contextmemory", "hybrid@1"):
        rows.update({(c["method"], r["fact"], r["style"]): r for r in c["rows"]})
    else:
        rows.update({(c["method"] + "+cut0.3", r["fact"], r["style"]): r for r in c["rows"]})
for c in res_top["cells"]:
    rows.update({(c["method"], r["fact"], r["style"]): r for r in c["rows"]})
prow = {(r["fact"], r["style"]): r for r in pl["rows"]}
P = pl["rows"]
rank1 = sum(p["hits"][0]["fact"] == p["fact"] for p in P)
ratio = lambda p, j: p["hits"][j]["score"] / p["hits"][0]["score"]
mx2 = max(P, key=lambda p: ratio(p, 1))
mx3 = max(P, key=lambda p: ratio(p, 2))
notplaced = [f"{p['fact']} {p['style']}" for p in P if not p["placed"] or p["placed"][0]["start"] != p["hits"][0]["start"]]
lines = ["## Search at 16k (placement.json, place(q, 3) without the cut)", "",
         f"* asked fact rank 1: {rank1}/{len(P)}; rank-1 fused score {min(p['hits'][0]['score'] for p in P):.2f}-{max(p['hits'][0]['score'] for p in P):.2f}; "
         f"rank 2 at most {max(p['hits'][1]['score'] for p in P):.2f}, rank 3 at most {max(p['hits'][2]['score'] for p in P):.2f}",
         f"* max rank-2/rank-1 {ratio(mx2, 1):.3f} (fact {mx2['fact']} {mx2['style']}), max rank-3/rank-1 {ratio(mx3, 2):.3f} (fact {mx3['fact']} {mx3['style']})",
         f"* rank 1 not placed by place() (among the last RECENT_TOKENS tokens): {', '.join(notplaced) or '-'}",
         "", "## Relative cuts simulated (answer of hybrid@j where the rule places j; j = 0: contextmemory)", "",
         "Rule A (the brief's): keep placed passage j if its score >= r x the search's rank-1 score.",
         "Rule B (working tree's place(), PLACE_MIN_SHARE): keep it if its score >= r x the best *placed* passage's score.", "",
         "| rule | r | chat | completion | placed (mean) | questions placing != 1 | differs from hybrid@1 |",
         "|---|---|---|---|---|---|---|"]
table = []
for rule in ("A", "B"):
    for r in [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
        got = {"chat": 0, "completion": 0}; js = []; odd = []; diff = []; undecided = 0
        for style in ("chat", "completion"):
            for i, f in enumerate(facts):
                p = prow[(i, style)]
                s = [h["score"] for h in p["placed"]]
                ref = p["hits"][0]["score"] if rule == "A" else (s[0] if s else 0)
                j = sum(1 for x in s if x >= r * ref)
                js.append(j)
                row = rows.get((f"hybrid@{j}" if j else "contextmemory", f["answer"], style))
                c1 = rows[("hybrid@1", f["answer"], style)]["correct"]
                if j != 1:
                    odd.append(f"{i} {style} ({j})")
                if row is None:
                    undecided += 1
                    continue
                if row["correct"] != c1:
                    diff.append(f"{i} {style}: {'right' if row['correct'] else 'wrong'} (@1 {'right' if c1 else 'wrong'})")
                got[style] += row["correct"]
        table.append({"rule": rule, "r": r, **got, "undecided": undecided, "placed_mean": sum(js) / len(js), "placing_not_1": odd, "differs_from_hybrid1": diff})
        lines.append(f"| {rule} | {r} | {got['chat']}/{len(facts)} | {got['completion']}/{len(facts)} | {sum(js)/len(js):.2f} | "
                     f"{len(odd)}: {', '.join(odd) or '-'} | {'; '.join(diff) or '-'}{f' ({undecided} undecided)' if undecided else ''} |")
lines += ["", "## Per question: top 3 of the search (fact index, * asked, p prose), placed without cut", "",
          "| fact | style | rank 1-3 | scores | r2/r1 | r3/r1 | placed (no cut) |", "|---|---|---|---|---|---|---|"]
nm = lambda x, i: "*" if x == i else "p" if x is None else str(x)
for p in P:
    h = p["hits"][:3]
    sc = " ".join("%.2f" % x["score"] for x in h)
    lines.append(f"| {p['fact']} | {p['style']} | {' '.join(nm(x['fact'], p['fact']) for x in h)} | {sc} | "
                 f"{ratio(p, 1):.3f} | {ratio(p, 2):.3f} | {' '.join(nm(x['fact'], p['fact']) for x in p['placed'])} |")
(topk / "cuts.md").write_text("\n".join(lines) + "\n")
(topk / "cuts.json").write_text(json.dumps(table, indent=1))
print("\n".join(lines))
