"""A verification's results per table, for people (lines) and machines (--json)."""

from __future__ import annotations

from typing import Any



def summarize(request: str, sink: str, tables: list[str], all_results: list[dict[str, Any]],
              rechecked: int = 0, repaired: int = 0) -> dict[str, Any]:
    """Per table: ranges and rows compared, and the ranges that differ with their counts."""
    out = []
    for table in tables:
        results = [r for r in all_results if r["table"] == table]
        differing = [{"lo": r.get("lo"), "hi": r.get("hi"), "missing": r["missing"], "extra": r["extra"],
                      "different": r["different"]} for r in results if not r["equal"]]
        differing.sort(key=lambda r: (r["lo"] is not None, repr(r["lo"])))
        out.append({
            "table": table, "ranges": len(results), "rows": sum(r["rows"] for r in results),
            "target_rows": sum(r["target_rows"] for r in results),
            "missing": sum(r["missing"] for r in results), "extra": sum(r["extra"] for r in results),
            "different": sum(r["different"] for r in results), "differing_ranges": differing,
            "equal": not differing, "repaired_ranges": sum(1 for r in results if r.get("repair")),
            "deleted": sum(r.get("deleted", 0) for r in results),
        })
    return {"request": request, "sink": sink, "tables": out, "equal": all(t["equal"] for t in out),
            "rechecked_ranges": rechecked, "repaired_ranges": repaired}


def lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for t in summary["tables"]:
        verdict = "equal" if t["equal"] else (f"DIFFERS: {t['missing']} missing, {t['extra']} extra, "
                                              f"{t['different']} different")
        out.append(f"{t['table']}: {t['ranges']} ranges, {t['rows']} source rows, {t['target_rows']} target rows "
                   f"compared: {verdict}")
        if t["repaired_ranges"]:
            out.append(f"  repaired {t['repaired_ranges']} ranges: their source rows re-published, {t['deleted']} "
                       "target rows the source does not have deleted")
        for r in t["differing_ranges"]:
            lo = "start" if r["lo"] is None else f"after {r['lo']}"
            hi = "end" if r["hi"] is None else f"up to {r['hi']}"
            out.append(f"  range {lo} {hi}: {r['missing']} missing, {r['extra']} extra, {r['different']} different")
    return out
